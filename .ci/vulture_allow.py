"""Names vulture cannot see used (make lint): framework callbacks and attributes set for
pynetdicom, http.server, structlog and prometheus-client, and API used only by the tests."""

# ruff: noqa
all_keys  # unused function (dcmrecvd/config.py:347)
documented_toml  # unused function (dcmrecvd/config.py:637)
C_STORE_RSP  # unused variable (dcmrecvd/dimse.py:14)
default_request_version  # unused variable (dcmrecvd/health.py:95)
server_version  # unused variable (dcmrecvd/health.py:96)
error_message_format  # unused variable (dcmrecvd/health.py:97)
error_content_type  # unused variable (dcmrecvd/health.py:98)
_.do_GET  # unused method (dcmrecvd/health.py:100)
do_DELETE  # unused variable (dcmrecvd/health.py:116)
do_PATCH  # unused variable (dcmrecvd/health.py:116)
do_POST  # unused variable (dcmrecvd/health.py:116)
do_PUT  # unused variable (dcmrecvd/health.py:116)
_.log_message  # unused method (dcmrecvd/health.py:128)
_.log_error  # unused method (dcmrecvd/health.py:131)
daemon_threads  # unused variable (dcmrecvd/health.py:136)
_.address_family  # unused attribute (dcmrecvd/health.py:142)
_.handle  # unused method (dcmrecvd/health.py:151)
daemon_threads  # unused variable (dcmrecvd/health.py:159)
_.address_family  # unused attribute (dcmrecvd/health.py:163)
critical  # unused variable (dcmrecvd/logs.py:116)
_.collect  # unused method (dcmrecvd/metrics.py:45)
_.diagnostic  # unused attribute (dcmrecvd/negotiation.py:113)
_.result_source  # unused attribute (dcmrecvd/negotiation.py:113)
_.implementation_class_uid  # unused attribute (dcmrecvd/negotiation.py:158)
_.implementation_version_name  # unused attribute (dcmrecvd/negotiation.py:161)
_.service_class_application_information  # unused attribute (dcmrecvd/negotiation.py:169)
_.result_source  # unused attribute (dcmrecvd/negotiation.py:176)
_.presentation_context_definition_results_list  # unused attribute (dcmrecvd/negotiation.py:177)
_.in_dataset  # unused property (dcmrecvd/upper_layer.py:149)
_.maximum_number_operations_performed  # set for pynetdicom's encoder (dcmrecvd/negotiation.py)
_.commit  # storage.PendingFile.commit / Writer.commit: the one-file API, used by tests and bench/floor.py
_.all_events  # Outbox.all_events: for tests and inspection
_.heartbeat  # pika connection parameters (dcmrecvd/amqp.py)
_.blocked_connection_timeout
_.connection_attempts
_.credentials
_.readable  # io.RawIOBase protocol (dcmrecvd/health.py: _ByDeadline)
_.readinto
request_queue_size  # socketserver's listen backlog (dcmrecvd/health.py)
_.rfile  # BaseHTTPRequestHandler reads its request from it (dcmrecvd/health.py)
# dcmrecvd/remote: the one home of outgoing associations (#22 item 5); its callers are the
# Storage Commitment reports and the forwarder; tests/test_remote.py drives it against DCMTK.
AssociationPool
_.opened
_.close_idle
_.in_use
_.echo
proposals  # wire.requestor.proposals: how callers of dcmrecvd.remote number their contexts
_.path_exists  # API for Storage Commitment and the duplicate policy (dcmrecvd/store/instance_index.py)
_.usage  # journal use, for tests and inspection (dcmrecvd/store/journal.py)
_.is_implicit_VR  # pydicom's writer reads these flags of the buffer (dcmrecvd/events/forward_dimse.py)
_.is_little_endian
_._missing_  # enum hook: output.duplicate_status codes without a name (dcmrecvd/wire/status.py)
