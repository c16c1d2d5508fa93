#!/usr/bin/env bash
# Run a command beside a private systemd-journald, without systemd as PID 1.
# Must run in a mount namespace of its own:
#   unshare --mount --propagation private bash private_journal.sh TMPDIR CMD...
# Journal files land in TMPDIR/log (read them with journalctl -D TMPDIR/log).
set -euo pipefail
T=$1; shift
mkdir -p "$T/run" "$T/log" "$T/var" /run/systemd/journal /run/log/journal /var/log/journal
mount --bind "$T/run" /run/systemd/journal
mount --bind "$T/log" /run/log/journal
mount --bind "$T/var" /var/log/journal
printf '[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\nRateLimitBurst=0\n' \
  > "$T/journald.conf"
touch /etc/systemd/journald.conf 2>/dev/null || true
mount --bind "$T/journald.conf" /etc/systemd/journald.conf
if [ ! -s /etc/machine-id ]; then
  tr -d '-' < /proc/sys/kernel/random/uuid > "$T/machine-id"
  touch /etc/machine-id && mount --bind "$T/machine-id" /etc/machine-id
fi
/lib/systemd/systemd-journald &
journald=$!
deadline=$((SECONDS + 10))
until [ -S /run/systemd/journal/socket ] && [ -S /run/systemd/journal/stdout ]; do
  [ $SECONDS -lt $deadline ] || { echo "journald did not start" >&2; exit 97; }
  sleep 0.01
done
set +e
"$@"
rc=$?
set -e
journalctl --sync || true
kill "$journald"
wait "$journald" || true
exit $rc
