"""The dcmrecv command line: every option of the table, @files, rightmost-wins, errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from conftest import dcmrecvd

from dcmrecvd.conf import config, flags
from dcmrecvd.errors import UsageError

pytestmark = pytest.mark.inprocess

SAMPLE = {
    "-ll": "debug",
    "-ta": "7",
    "-td": "9",
    "-pdu": "32768",
    "--log-format": "json",
    "--max-associations": "5",
    "--drain-timeout": "3",
}
PREREQ = {
    "+ps": ["+tls", "k", "c"],
    "+pw": ["+tls", "k", "c"],
    "-pw": ["+tls", "k", "c"],
    "+ws": ["+rs", "seed"],
    "+wf": ["+rs", "seed"],
}
ACTIONS = {"--help", "--version", "--list-ciphers", "--print-config", "--check-config"}


TLS_STANDALONE = {"--enable-tls", "--disable-tls", "--list-ciphers"}


def needs_tls(opt: flags.Option) -> bool:
    """Every TLS option but +tls, -tls and +cc is only allowed with --enable-tls, as in dcmrecv."""
    return opt.group == flags.G_TLS and opt.long not in TLS_STANDALONE


def example(opt: flags.Option) -> list[str]:
    """A valid use of ``opt`` with sample values."""
    spelling = opt.short or opt.long
    values = [SAMPLE.get(spelling, f"v{i}") for i in range(len(opt.values))]
    prereq = PREREQ.get(spelling, [])
    if needs_tls(opt) and "+tls" not in prereq:
        prereq = ["+tls", "k", "c", *prereq]
    return [*prereq, spelling, *values]


@pytest.mark.parametrize("opt", [o for o in flags.OPTIONS if needs_tls(o)], ids=lambda o: o.long)
def test_every_tls_option_without_enable_tls_is_a_syntax_error(opt: flags.Option, config_dir: Path) -> None:
    """#11.1: dcmrecv's wording and exit code; never a plain receiver that ignores them."""
    argv = [opt.short or opt.long, *example(opt)[len(example(opt)) - len(opt.values) :]]
    for spelling in opt.spellings:
        argv[argv.index(opt.short or opt.long)] = spelling
        with pytest.raises(UsageError, match=f"^{opt.long} only allowed with --enable-tls$"):
            flags.parse([*argv, "104"])
        argv[argv.index(spelling)] = opt.short or opt.long
    result = dcmrecvd(*argv, "104", config_dir=config_dir)
    assert result.returncode == 1
    assert f"{opt.long} only allowed with --enable-tls" in result.stderr


CONFIG_OPTIONS = [o for o in flags.OPTIONS if any(not k.startswith("cli.") for k in o.sets) or o.appends]


@pytest.mark.parametrize("opt", flags.OPTIONS, ids=lambda o: o.long)
def test_every_spelling_is_accepted(opt: flags.Option) -> None:
    for spelling in opt.spellings:
        argv = example(opt)
        argv[argv.index(opt.short or opt.long)] = spelling
        cmd = flags.parse(argv)
        assert opt in cmd.used


@pytest.mark.parametrize("opt", CONFIG_OPTIONS, ids=lambda o: o.long)
def test_every_option_sets_its_keys(opt: flags.Option) -> None:
    cmd = flags.parse(example(opt))
    for dotted, value in opt.sets.items():
        section, _, name = dotted.partition(".")
        got = cmd.overrides[section][name]
        if value == flags.ARG0:
            assert str(got) == example(opt)[-len(opt.values)]
        elif value != flags.ARG1:
            assert got == value
    for dotted in opt.appends:
        section, _, name = dotted.partition(".")
        assert cmd.overrides[section][name] == [example(opt)[-1]]


@pytest.mark.parametrize("opt", CONFIG_OPTIONS, ids=lambda o: o.long)
def test_print_config_round_trips(opt: flags.Option, tmp_path: Path) -> None:
    """TOML printed for any command line gives the same config when loaded alone."""
    cmd = flags.parse([*example(opt), "104"])
    effective = config.build([config.Layer("<cli>", cmd.overrides)])
    printed = config.to_toml(effective)
    path = tmp_path / "printed.toml"
    path.write_text(printed)
    empty = tmp_path / "empty"
    empty.mkdir()
    reloaded = config.load(config_dir=empty, extra_file=path, environ={})
    if opt.long == "--use-passwd":  # the password is never printed
        assert "tls.password is set but not printed" in printed
        assert "v0" not in printed
        assert reloaded.tls.password == ""
        return
    assert reloaded == effective


def test_the_issue_example_round_trips_through_the_cli(config_dir: Path, tmp_path: Path) -> None:
    args = [
        "-aet",
        "X",
        "-od",
        "out",
        "+ssd",
        "+fsu",
        "-fe",
        ".dcm",
        "-xf",
        "etc/storescp.cfg",
        "Default",
        "11112",
    ]
    result = dcmrecvd("--print-config", *args, config_dir=config_dir)
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    assert data["network"]["ae_title"] == "X"
    assert data["network"]["port"] == 11112
    assert data["output"] == {
        **data["output"],
        "directory": "out",
        "subdirectory": "series-date",
        "filenames": "short-unique",
        "extension": ".dcm",
    }
    assert data["association"] == {"config_file": "etc/storescp.cfg", "profile": "Default"}
    printed = tmp_path / "p.toml"
    printed.write_text(result.stdout)
    again = dcmrecvd("--config", str(printed), "--print-config", config_dir=tmp_path / "nothing")
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout


def test_rightmost_wins_for_exclusive_options() -> None:
    cmd = flags.parse(["+fu", "+fsu", "+fd", "-v", "-q", "+B", "-B", "--ignore", "-aet", "A", "-uca"])
    assert cmd.overrides["output"]["filenames"] == "default"
    assert cmd.overrides["logging"]["level"] == "fatal"
    assert cmd.overrides["output"]["mode"] == "ignore"
    assert cmd.overrides["network"]["ae_title"] == ""
    cmd = flags.parse(["-uca", "-aet", "A", "-aet", "B"])
    assert cmd.overrides["network"]["ae_title"] == "B"


def test_repeatable_options_accumulate() -> None:
    cmd = flags.parse(["+tls", "k", "c", "+cf", "a.pem", "+cf", "b.pem", "+crl", "c.crl"])
    assert cmd.overrides["tls"]["ca_files"] == ["a.pem", "b.pem"]
    assert cmd.overrides["tls"]["crl_check"] == "leaf"
    cmd = flags.parse(["+tls", "k", "c", "+cra", "+crl", "c.crl"])
    assert cmd.overrides["tls"]["crl_check"] == "chain"


def test_command_file_words_and_quotes(tmp_path: Path) -> None:
    (tmp_path / "cmd.txt").write_text('-aet  "my title"\n\t-od \'a "b" c\'  -v\n+fsu ""\n')
    cmd = flags.parse(["@" + str(tmp_path / "cmd.txt"), "104"])
    assert cmd.expanded == ["-aet", "my title", "-od", 'a "b" c', "-v", "+fsu", "104"]
    assert cmd.overrides["network"]["ae_title"] == "my title"
    assert cmd.port == 104


def test_quotes_split_words_as_in_dcmtk() -> None:
    assert flags.split_command_file('a"b c"d') == ["a", "b c", "d"]
    assert flags.split_command_file('"x\'y"') == ["x'y"]


def test_command_file_cannot_include_another(tmp_path: Path) -> None:
    (tmp_path / "inner.txt").write_text("-v\n")
    (tmp_path / "outer.txt").write_text(f"@{tmp_path / 'inner.txt'}\n")
    with pytest.raises(UsageError, match=r"Too many parameters|Invalid parameter"):
        flags.parse(["@" + str(tmp_path / "outer.txt"), "104"])


def test_arguments_prints_the_expansion(config_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("-aet 'A B'")
    result = dcmrecvd(
        "--arguments", "@" + str(tmp_path / "c.txt"), "--print-config", "104", config_dir=config_dir
    )
    assert result.returncode == 0
    assert "'--aetitle' 'A B'" in result.stderr
    assert "with 5 arguments" in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--foo", "104"], "Unknown option --foo"),
        (["-aet"], "Missing value for option --aetitle"),
        (["-pdu", "100", "104"], "Invalid value for option --max-pdu (underflow: 100)"),
        (["-pdu", "131073", "104"], "Invalid value for option --max-pdu (overflow: 131073)"),
        (["-pdu", "x", "104"], "Invalid value for option --max-pdu (x)"),
        (["-ta", "0", "104"], "Invalid value for option --acse-timeout (underflow: 0)"),
        (["-ll", "loud", "104"], "Invalid value for option --log-level (loud)"),
        (["70000"], "Invalid parameter value 70000 (overflow)"),
        (["0"], "Invalid parameter value 0 (underflow)"),
        (["abc"], "Invalid parameter value abc"),
        (["104", "105"], "Too many parameters"),
        (["+B", "+ssd", "104"], "--bit-preserving not allowed with --series-date-subdir"),
        (["@/nonexistent/cmd.txt"], "Cannot open command file '/nonexistent/cmd.txt'"),
        (["+pw", "secret", "104"], "--use-passwd only allowed with --enable-tls"),
        (["+ws", "104"], "--write-seed only allowed with --enable-tls"),
        (["+tls", "k", "c", "+ws", "104"], "--write-seed only allowed with --seed"),
        (["-ic", "104"], "--ignore-peer-cert only allowed with --enable-tls"),
    ],
)
def test_syntax_errors_exit_1_with_one_line(argv: list[str], message: str, config_dir: Path) -> None:
    result = dcmrecvd(*argv, config_dir=config_dir)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "secret" not in result.stderr


def test_help_lists_every_option(config_dir: Path) -> None:
    result = dcmrecvd("--help", config_dir=config_dir)
    assert result.returncode == 0
    for opt in flags.OPTIONS:
        assert opt.long in result.stdout
        if opt.short:
            assert f"  {opt.short} " in result.stdout
    assert "accepted for compatibility only" in result.stdout


def test_compat_options_warn(config_dir: Path, tmp_path: Path) -> None:
    tls = ["+tls", "k", "c"]
    result = dcmrecvd(*tls, "+rs", str(tmp_path / "seed"), "--print-config", "104", config_dir=config_dir)
    assert result.returncode == 0
    assert "--seed: accepted for compatibility only" in result.stderr


def test_no_arguments_prints_help_like_dcmrecv(config_dir: Path) -> None:
    result = dcmrecvd(config_dir=config_dir)
    assert result.returncode == 0
    assert "usage: dcmrecvd" in result.stdout


def test_version(config_dir: Path) -> None:
    result = dcmrecvd("--version", config_dir=config_dir)
    assert result.returncode == 0 and result.stdout.startswith("dcmrecvd ")


def test_list_ciphers(config_dir: Path) -> None:
    result = dcmrecvd("+cc", config_dir=config_dir)
    assert result.returncode == 0
    assert "TLS_AES_256_GCM_SHA384" in result.stdout


def test_add_crl_file_implies_leaf_checks_whatever_the_order() -> None:
    """The rule is on the option's row (``implies``), not special-cased in the parser."""
    assert flags.parse(["+tls", "k", "c", "+crl", "c.crl", "+cra"]).overrides["tls"]["crl_check"] == "chain"
    row = next(o for o in flags.OPTIONS if o.long == "--add-crl-file")
    assert row.implies == {"tls.crl_check": "leaf"}


def test_each_fact_has_one_list() -> None:
    """Log levels, log formats and TLS profile names: the flags, the config schema and the
    TLS code all use the one tuple."""
    import dataclasses

    from dcmrecvd.conf import config
    from dcmrecvd.ops import logs
    from dcmrecvd.serve import tls

    fields = {f.name: f for f in dataclasses.fields(config.LoggingConfig)}
    assert fields["level"].metadata["choices"] == config.LOG_LEVELS == tuple(logs.LEVELS)
    assert fields["format"].metadata["choices"] == config.LOG_FORMATS
    assert tuple(tls.PROFILES) == config.TLS_PROFILES
    set_by_flags = {o.sets["tls.profile"] for o in flags.OPTIONS if "tls.profile" in o.sets}
    assert set_by_flags <= set(config.TLS_PROFILES)


def test_the_two_service_units_harden_alike() -> None:
    """dcmrecvd.service and dcmrecvd@.service differ only where an instance must."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "systemd"

    def service(name: str) -> dict[str, list[str]]:
        section, out = "", {}
        for line in (root / name).read_text().splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and line and not line.startswith("#"):
                key, _, value = line.partition("=")
                out.setdefault(key, []).append(value)
        return out

    single, instances = service("dcmrecvd.service"), service("dcmrecvd@.service")
    differ = {key for key in single.keys() | instances.keys() if single.get(key) != instances.get(key)}
    assert differ == {"ExecStart", "StateDirectory"}
    assert "SystemCallFilter" in single and "ProtectSystem" in single
