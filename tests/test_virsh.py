"""The virsh session's pieces that need no libvirt: quoting words for virsh's shell, and which URIs are local."""

from __future__ import annotations

import pytest

from migrate_cli.errors import UsageError
from migrate_cli.guest.libvirt import domain_name
from migrate_cli.guest.virsh import check_local_uri, quote


def test_a_word_with_quotes_backslashes_and_spaces_is_one_double_quoted_virsh_word() -> None:
    assert quote('{"execute": "qom-get"}') == '"{\\"execute\\": \\"qom-get\\"}"'
    assert quote("a\\b c") == '"a\\\\b c"'
    assert quote("it's") == '"it\'s"'


@pytest.mark.parametrize("uri", ["qemu:///system", "qemu:///session", "qemu+unix:///system?socket=/run/x.sock"])
def test_local_qemu_uris_are_accepted(uri: str) -> None:
    check_local_uri(uri)


@pytest.mark.parametrize(
    "uri", ["qemu+ssh://root@otherhost/system", "qemu+tcp://10.0.0.2/system", "qemu://otherhost/system"]
)
def test_a_uri_naming_another_host_is_refused_as_remote(uri: str) -> None:
    with pytest.raises(UsageError, match="remote"):
        check_local_uri(uri)


def test_a_uri_of_another_hypervisor_is_refused() -> None:
    with pytest.raises(UsageError, match="QEMU guests"):
        check_local_uri("xen:///system")


def test_libvirt_names_a_domain_and_an_empty_name_is_a_usage_error() -> None:
    assert domain_name("libvirt:vm1") == "vm1"
    assert domain_name("/dev/shm/vm.ram") is None
    with pytest.raises(UsageError):
        domain_name("libvirt:")
