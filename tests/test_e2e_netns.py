"""End to end across network namespaces: `vmmig send` in one namespace, `vmmig recv` in another, a veth pair between.

Unlike the 127.0.0.1 tests, the bytes cross a real (virtual) link with its own MTU, qdisc and carrier: the link can
be delayed and made lossy with `tc netem` (where the kernel has it) and taken down with `ip link set down` mid-way,
which the sender must survive with --retries and a resumed session. Needs root and `ip netns`; skipped otherwise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import json_report, make_image, wait_until_landed
from .netns import NetnsPair, NetnsUnavailable, ip, remove_stale_namespaces, unavailable_reason

MiB = 1 << 20


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[NetnsPair]:
    """Namespaces `a` and `b` joined by a veth pair; always torn down (processes killed by PID, namespaces deleted)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    remove_stale_namespaces()
    pair = NetnsPair(tmp_path)
    try:
        pair.open()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture(scope="module")
def mixed_32m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("netns-images") / "mixed-32m.img", 32 * MiB)


@pytest.fixture(scope="module")
def mixed_8m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("netns-images") / "mixed-8m.img", 8 * MiB, seed=3)


@pytest.fixture(scope="module")
def random_16m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image(tmp_path_factory.mktemp("netns-images") / "random-16m.img", 16 * MiB, profile="random", seed=7)


def rx_bytes(pair: NetnsPair, side: str) -> int:
    dev = pair.veth_a if side == "a" else pair.veth_b
    (link,) = json.loads(ip("-n", pair.ns(side), "-j", "-s", "link", "show", "dev", dev).stdout)
    return int(link["stats64"]["rx"]["bytes"])


def assert_verified(dest: Path, source: Path) -> None:
    assert dest.read_bytes() == source.read_bytes(), "DEST differs from the image"
    assert not Path(f"{dest}.partial").exists() and not Path(f"{dest}.partial.state").exists()


def test_a_migration_across_a_veth_pair_verifies(netns: NetnsPair, tmp_path: Path, mixed_32m: Path) -> None:
    dest = tmp_path / "dest.img"
    recv = netns.recv("b", dest, "--json")
    assert recv.address.startswith(f"{netns.addr_b}:"), recv.address
    before = rx_bytes(netns, "b")
    send = netns.send("a", mixed_32m, recv.address, "--json", "--compress", "zlib",
                      "--state-file", str(tmp_path / "send.state"))  # fmt: skip
    code, out, err = send.wait(60)
    recv_code, recv_out, recv_err = recv.wait(30)
    assert (code, recv_code) == (0, 0), err + recv_err
    sent, received = json_report(out), json_report(recv_out)
    assert sent["status"] == received["status"] == "completed"
    assert sent["digest"] == received["digest"]
    assert sent["transferred"] == received["transferred"]
    assert rx_bytes(netns, "b") - before >= sent["transferred"], "the migration must have crossed the veth pair"
    assert_verified(dest, mixed_32m)


def test_a_migration_over_a_delayed_lossy_link_verifies(netns: NetnsPair, tmp_path: Path, mixed_8m: Path) -> None:
    try:
        netns.add_netem("delay", "20ms", "loss", "1%")
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    dest = tmp_path / "dest.img"
    recv = netns.recv("b", dest, "--json")
    send = netns.send("a", mixed_8m, recv.address, "--json", "--compress", "zlib",
                      "--state-file", str(tmp_path / "send.state"))  # fmt: skip
    code, out, err = send.wait(90)
    recv_code, recv_out, recv_err = recv.wait(30)
    assert (code, recv_code) == (0, 0), err + recv_err
    sent = json_report(out)
    throughput = (
        f"netem delay 20ms loss 1% each way: {sent['transferred']} wire bytes in {sent['total-time']} ms, "
        f"{sent['mbps']} Mbit/s on the wire, image {sent['image-mbytes-per-second']} MB/s, resumes {sent['resumes']}"
    )
    print(throughput)
    assert sent["digest"] == json_report(recv_out)["digest"], throughput
    assert_verified(dest, mixed_8m)


@pytest.mark.parametrize("side", ["a", "b"], ids=["down-at-sender", "down-at-receiver"])
def test_a_link_cut_mid_way_is_resumed(netns: NetnsPair, tmp_path: Path, random_16m: Path, side: str) -> None:
    dest = tmp_path / "dest.img"
    control = tmp_path / "recv.sock"
    recv = netns.recv("b", dest, "--json", "--io-timeout", "2s", "--resume-window", "30s", "--control", str(control))
    send = netns.send(
        "a", random_16m, recv.address, "--json", "--compress", "none", "--max-bandwidth", "4M", "--retries", "10",
        "--retry-delay", "500ms", "--io-timeout", "2s", "--state-file", str(tmp_path / "send.state"),
    )  # fmt: skip
    wait_until_landed(control)  # the cut must hit a session that holds pages, or there is nothing to resume
    assert send.popen.poll() is None, "the sender finished before the cut: the cap did not hold"
    netns.set_link(side, up=False)
    try:
        time.sleep(3)
    finally:
        netns.set_link(side, up=True)
    code, out, err = send.wait(60)
    recv_code, recv_out, recv_err = recv.wait(30)
    assert (code, recv_code) == (0, 0), err + recv_err
    sent, received = json_report(out), json_report(recv_out)
    assert sent["resumes"] >= 1 and received["resumes"] >= 1, err + recv_err
    assert "retry 1 of 10" in err
    assert "waiting up to 30s for the sender to resume" in recv_err
    # `transferred` counts the last connection only: it carried the rest, not the whole image again.
    assert sent["transferred"] < 16 * MiB, (sent["transferred"], err)
    assert sent["digest"] == received["digest"]
    assert_verified(dest, random_16m)
