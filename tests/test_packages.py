"""The .deb under real systemd (a booted Debian 12 container), and the RPM's contents.

Slow by nature (a package build, a debootstrap the first time): the whole
module is one story told in order, on one container that boots with a
volatile overlay, so every run starts from the same clean system.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, need, port_open, run, wait_for
from datasets import make_dataset, write

pytestmark = pytest.mark.container

CACHE = Path(os.environ.get("DCMRECVD_CI_CACHE", "/var/tmp/dcmrecvd-ci"))
ROOTFS = CACHE / "rootfs-bookworm"
DIST = ROOT / "dist"


def objects_under(top: str) -> tuple[str, ...]:
    """find(1) for the regular files under ``top`` (the packaged service keeps its state in
    /var/lib/dcmrecvd/state, beside the objects in /var/lib/dcmrecvd/incoming, not among them)."""
    return ("find", top, "-type", "f")


def sh(*cmd: str, check: bool = True, timeout: float = 900, **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The built .deb, and the same package repacked as a higher version (the upgrade)."""
    for tool in ("dpkg-buildpackage", "dh_virtualenv", "lintian"):
        need(tool)
    for old in DIST.glob("dcmrecvd_*.deb"):
        old.unlink()
    sh("make", "-C", str(ROOT), "deb")
    (deb,) = DIST.glob("dcmrecvd_*_amd64.deb")
    work = tmp_path_factory.mktemp("repack")
    tree = work / "tree"
    sh("dpkg-deb", "-R", str(deb), str(tree))
    control = tree / "DEBIAN" / "control"
    control.write_text(re.sub(r"^Version: (.*)$", r"Version: \1+upgrade1", control.read_text(), flags=re.M))
    upgraded = work / "dcmrecvd_upgrade.deb"
    sh("dpkg-deb", "--root-owner-group", "-b", str(tree), str(upgraded))
    return deb, upgraded


def test_lintian_clean(debs: tuple[Path, Path]) -> None:
    result = sh("lintian", "--tag-display-limit", "0", str(debs[0]), check=False)
    problems = [line for line in result.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert problems == [], "\n".join(problems[:30])


def test_deb_contents(debs: tuple[Path, Path]) -> None:
    listing = sh("dpkg-deb", "-c", str(debs[0])).stdout
    for path in (
        "./usr/bin/dcmrecvd",
        "./lib/systemd/system/dcmrecvd.service",
        "./lib/systemd/system/dcmrecvd.socket",
        "./lib/systemd/system/dcmrecvd@.service",
        "./lib/systemd/system/dcmrecvd@.socket",
        "./etc/dcmrecvd/dcmrecvd.toml",
        "./etc/dcmrecvd/storescp.cfg",
        "./etc/dcmrecvd/dcmrecvd.toml.d/",
        "./usr/lib/sysusers.d/dcmrecvd.conf",
        "./usr/lib/tmpfiles.d/dcmrecvd.conf",
        "./usr/share/man/man8/dcmrecvd.8.gz",
        "./usr/share/man/man5/dcmrecvd.toml.5.gz",
        "./opt/venvs/dcmrecvd/bin/dcmrecvd",
    ):
        assert f" {path}" in listing, path
    control_dir = Path(sh("mktemp", "-d").stdout.strip())
    sh("dpkg-deb", "-e", str(debs[0]), str(control_dir))
    assert (control_dir / "conffiles").read_text().split() == [
        "/etc/dcmrecvd/dcmrecvd.toml",
        "/etc/dcmrecvd/storescp.cfg",
    ]
    postinst = (control_dir / "postinst").read_text()
    assert "systemd-sysusers" in postinst and "deb-systemd-helper enable 'dcmrecvd.socket'" in postinst
    assert postinst.index("systemd-sysusers") < postinst.index("systemd-tmpfiles")
    shutil.rmtree(control_dir)


def ensure_rootfs() -> Path:
    """A Debian 12 tree with systemd and python3, cached between runs."""
    marker = ROOTFS / ".complete"
    if marker.exists():
        return ROOTFS
    need("debootstrap")
    shutil.rmtree(ROOTFS, ignore_errors=True)
    ROOTFS.parent.mkdir(parents=True, exist_ok=True)
    sh(
        "debootstrap",
        "--variant=minbase",
        "--include=systemd,systemd-sysv,dbus,procps,python3",
        "bookworm",
        str(ROOTFS),
        timeout=1200,
    )
    marker.touch()
    return ROOTFS


class Container:
    """A booted systemd-nspawn container sharing the host network."""

    def __init__(self, rootfs: Path, packages: Path) -> None:
        need("systemd-nspawn")
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn",
                "-D",
                str(rootfs),
                "--register=no",
                "--keep-unit",
                "-b",
                "--console=pipe",
                "--volatile=overlay",
                f"--bind-ro={packages}:/mnt/pkg",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.init = int(wait_for(self._init_pid, timeout=30))
        try:
            wait_for(lambda: self._state() in ("running", "degraded"), timeout=120, interval=0.2)
        except AssertionError:
            state = self._state()
            jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False).stdout
            self.stop()
            raise AssertionError(f"container never finished booting ({state!r}); jobs:\n{jobs}") from None

    def _state(self) -> str:
        return self.run("systemctl", "is-system-running", check=False).stdout.strip()

    def _init_pid(self) -> int | None:
        """The container's PID 1, seen from the host.

        Why not simply nspawn's first child: while it starts, nspawn's child is its own
        "outer child" (a fork in our PID namespace that exits once it has cloned the
        container's init); entering that one's namespaces enters none of the container's.
        """
        children = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        for child in children:
            try:
                status = Path(f"/proc/{child}/status").read_text()
            except OSError:
                continue
            nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
            if len(nspid) >= 2 and nspid[-1] == "1":
                return int(child)
        return None

    def run(self, *cmd: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", "-t", str(self.init), "-a", *cmd, check=check, timeout=timeout)

    def active(self, unit: str) -> str:
        return self.run("systemctl", "is-active", unit, check=False).stdout.strip()

    def main_pid(self, unit: str) -> int:
        return int(self.run("systemctl", "show", "-P", "MainPID", unit).stdout.strip())

    def journal(self, *args: str) -> list[dict[str, str]]:
        out = self.run("journalctl", "-u", "dcmrecvd", "-o", "json", "--no-pager", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def container(debs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    assert not port_open(104), "something on this host already listens on port 104"
    packages = tmp_path_factory.mktemp("pkg")
    shutil.copy(debs[0], packages / "dcmrecvd.deb")
    shutil.copy(debs[1], packages / "dcmrecvd_upgrade.deb")
    box = Container(ensure_rootfs(), packages)
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("objects")
    return [write(make_dataset(rows=32, columns=32, seed=i), folder / f"{i}.dcm") for i in range(3)]


def test_install_starts_the_service(container: Container) -> None:
    container.run("dpkg", "-i", "/mnt/pkg/dcmrecvd.deb")
    wait_for(lambda: container.active("dcmrecvd.service") == "active", timeout=30)
    assert container.active("dcmrecvd.socket") == "active"
    assert container.run("id", "-u", "dcmrecvd").returncode == 0
    owner = container.run("stat", "-c", "%U:%G %a", "/var/lib/dcmrecvd").stdout.split()
    assert owner == ["dcmrecvd:dcmrecvd", "750"]
    assert container.run("test", "-d", "/etc/dcmrecvd/dcmrecvd.toml.d").returncode == 0


def test_storescu_from_the_host_lands_in_var_lib(container: Container, sample: list[Path]) -> None:
    result = run([need("storescu"), "127.0.0.1", "104", *map(str, sample)])
    assert result.returncode == 0, result.stderr
    incoming = objects_under("/var/lib/dcmrecvd/incoming")
    listing = container.run(*incoming, "-printf", "%u %f\n").stdout.split("\n")
    files = [line for line in listing if line.strip()]
    assert len(files) == 3
    assert all(line.startswith("dcmrecvd CT.") for line in files)


@pytest.mark.usefixtures("sample")
def test_journal_has_dicom_fields(container: Container) -> None:
    entries = [e for e in container.journal() if e.get("DCMRECVD_EVENT") == "store.completed"]
    assert len(entries) == 3
    entry = entries[0]
    assert entry["DICOM_CALLING_AET"] == "STORESCU"
    assert entry["DICOM_FILE"].startswith("/var/lib/dcmrecvd/incoming/CT.")
    assert entry["DICOM_STATUS"] == "0x0000"
    assert entry["SYSLOG_IDENTIFIER"] == "dcmrecvd"
    assert "DICOM_SOP_INSTANCE_UID" in entry and "DICOM_PEER" in entry


def test_reload_applies_a_changed_profile(container: Container) -> None:
    pid = container.main_pid("dcmrecvd.service")
    container.run(
        "sh",
        "-c",
        "printf '[association]\\nprofile = \"AllDICOM\"\\n' > /etc/dcmrecvd/dcmrecvd.toml.d/50-profile.toml",
    )
    container.run("systemctl", "reload", "dcmrecvd")
    wait_for(lambda: any(e.get("DCMRECVD_EVENT") == "reload.completed" for e in container.journal()))
    done = next(e for e in container.journal() if e.get("DCMRECVD_EVENT") == "reload.completed")
    assert done["DCMRECVD_PROFILE"] == "ALLDICOM"
    assert container.active("dcmrecvd.service") == "active"
    assert container.main_pid("dcmrecvd.service") == pid
    assert run([need("echoscu"), "127.0.0.1", "104"]).returncode == 0


def test_stop_is_clean_and_socket_activation_restarts(container: Container) -> None:
    container.run("systemctl", "stop", "dcmrecvd.service")
    assert container.active("dcmrecvd.service") == "inactive"
    result = container.run("systemctl", "show", "-P", "Result", "dcmrecvd.service").stdout.strip()
    assert result == "success"
    assert container.active("dcmrecvd.socket") == "active"
    assert run([need("echoscu"), "127.0.0.1", "104"]).returncode == 0  # the first connection starts it
    wait_for(lambda: container.active("dcmrecvd.service") == "active", timeout=30)


def test_upgrade_keeps_modified_config_and_restarts(container: Container) -> None:
    container.run("sh", "-c", "echo '# site change' >> /etc/dcmrecvd/dcmrecvd.toml")
    before = container.main_pid("dcmrecvd.service")
    container.run("dpkg", "--force-confold", "-i", "/mnt/pkg/dcmrecvd_upgrade.deb")
    assert "+upgrade1" in container.run("dpkg-query", "-W", "-f", "${Version}", "dcmrecvd").stdout
    assert "# site change" in container.run("cat", "/etc/dcmrecvd/dcmrecvd.toml").stdout
    assert container.run("test", "-f", "/etc/dcmrecvd/dcmrecvd.toml.d/50-profile.toml").returncode == 0
    wait_for(lambda: container.active("dcmrecvd.service") == "active", timeout=30)
    assert container.main_pid("dcmrecvd.service") != before
    assert run([need("echoscu"), "127.0.0.1", "104"]).returncode == 0


def test_second_receiver_from_the_template_units(container: Container, sample: list[Path]) -> None:
    port = 11113
    assert not port_open(port)
    container.run(
        "sh",
        "-c",
        f"printf '[output]\\ndirectory = \"/var/lib/dcmrecvd/{port}/incoming\"\\n' > "
        f"/etc/dcmrecvd/instances/{port}.toml",
    )
    container.run("systemctl", "enable", "--now", f"dcmrecvd@{port}.socket")
    assert run([need("storescu"), "127.0.0.1", str(port), str(sample[0])]).returncode == 0
    wait_for(lambda: container.active(f"dcmrecvd@{port}.service") == "active", timeout=30)
    files = container.run(*objects_under(f"/var/lib/dcmrecvd/{port}/incoming")).stdout.split()
    assert len(files) == 1
    state = container.run("ls", f"/var/lib/dcmrecvd/{port}/state").stdout.split()
    assert "journal" in state and "output-directory" in state
    container.run("systemctl", "disable", "--now", f"dcmrecvd@{port}.socket", f"dcmrecvd@{port}.service")
    container.run("rm", "-rf", f"/var/lib/dcmrecvd/{port}")


def test_purge_keeps_received_images(container: Container) -> None:
    container.run("dpkg", "--purge", "dcmrecvd")
    assert container.run("test", "-e", "/etc/dcmrecvd/dcmrecvd.toml", check=False).returncode != 0
    assert container.run("test", "-e", "/opt/venvs/dcmrecvd", check=False).returncode != 0
    assert container.run("test", "-e", "/usr/bin/dcmrecvd", check=False).returncode != 0
    left = container.run(*objects_under("/var/lib/dcmrecvd/incoming")).stdout.split()
    assert len(left) == 3
    wait_for(lambda: not port_open(104), timeout=30)


# --------------------------------------------------------------------------- RPM


@pytest.fixture(scope="module")
def rpm_file() -> Path:
    need("rpmbuild")
    for old in DIST.glob("dcmrecvd-*.rpm"):
        old.unlink()
    sh("make", "-C", str(ROOT), "rpm")
    (path,) = DIST.glob("dcmrecvd-*.rpm")
    return path


def rpmq(*args: str) -> str:
    return sh("rpm", "-qp", *args, env={**os.environ, "HOME": "/tmp"}).stdout


def test_rpm_file_list_and_ownership(rpm_file: Path) -> None:
    listing = rpmq("-lv", str(rpm_file))
    for path in (
        "/usr/bin/dcmrecvd",
        "/usr/lib/systemd/system/dcmrecvd.service",
        "/usr/lib/systemd/system/dcmrecvd.socket",
        "/usr/lib/systemd/system/dcmrecvd@.service",
        "/usr/lib/sysusers.d/dcmrecvd.conf",
        "/usr/lib/tmpfiles.d/dcmrecvd.conf",
        "/etc/dcmrecvd/dcmrecvd.toml",
        "/etc/dcmrecvd/storescp.cfg",
        "/etc/dcmrecvd/dcmrecvd.toml.d",
        "/usr/share/man/man8/dcmrecvd.8",
        "/opt/venvs/dcmrecvd/bin/dcmrecvd",
    ):
        assert path in listing, path
    state = next(line for line in listing.splitlines() if line.endswith(" /var/lib/dcmrecvd"))
    assert state.startswith("drwxr-x---") and " dcmrecvd " in state
    assert (
        "/work/main"
        not in sh(
            "sh",
            "-c",
            f"rpm2cpio {rpm_file} | cpio -i --to-stdout './opt/venvs/dcmrecvd/bin/dcmrecvd' 2>/dev/null",
        ).stdout
    )


def test_rpm_config_flags_and_scriptlets(rpm_file: Path) -> None:
    configs = rpmq("--configfiles", str(rpm_file)).split()
    assert configs == ["/etc/dcmrecvd/dcmrecvd.toml", "/etc/dcmrecvd/storescp.cfg"]
    flags = rpmq("--queryformat", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]", str(rpm_file))
    assert "cn /etc/dcmrecvd/dcmrecvd.toml" in flags  # config(noreplace)
    scripts = rpmq("--scripts", str(rpm_file))
    assert "systemd-sysusers" in scripts
    assert "systemctl --no-reload preset dcmrecvd.socket dcmrecvd.service" in scripts
    assert "systemctl --no-reload disable --now dcmrecvd.service dcmrecvd.socket" in scripts
    assert "systemctl try-restart dcmrecvd.service" in scripts


def test_rpm_installs_into_a_private_root(rpm_file: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {**os.environ, "HOME": str(tmp_path)}
    sh("rpm", "--root", str(root), "--initdb", env=env)
    sh("rpm", "-i", "--root", str(root), "--nodeps", "--noscripts", str(rpm_file), env=env)
    assert (root / "etc/dcmrecvd/dcmrecvd.toml").is_file()
    assert os.readlink(root / "usr/bin/dcmrecvd") == "../../opt/venvs/dcmrecvd/bin/dcmrecvd"
    assert (root / "opt/venvs/dcmrecvd/bin/dcmrecvd").is_file()


def test_rpmlint_clean(rpm_file: Path) -> None:
    need("rpmlint")
    result = sh(
        "rpmlint",
        "-r",
        str(ROOT / "packaging/rpm/dcmrecvd.rpmlintrc"),
        str(rpm_file),
        check=False,
        env={**os.environ, "HOME": "/tmp"},
    )
    assert "0 errors, 0 warnings" in result.stdout, result.stdout[-3000:]
