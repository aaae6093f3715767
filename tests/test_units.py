"""Units: one parser for every size, rate and duration option."""

import pytest

from migrate_cli.units import format_bytes, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("4KiB", 4096),
        ("350M", 350_000_000),
        ("1GiB", 1 << 30),
        ("1G", 10**9),
        ("2T", 2 * 10**12),
        ("1TiB", 1 << 40),
        ("1.5M", 1_500_000),
        ("64 MiB", 64 << 20),
        ("8k", 8000),
        ("10B", 10),
    ],
)
def test_sizes_use_decimal_letters_and_binary_iec_suffixes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5M", "1.5B", "M"])
def test_malformed_sizes_are_refused_with_the_text_named(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_rates_accept_per_second_and_zero_means_unlimited() -> None:
    assert parse_rate("350M") == 350_000_000
    assert parse_rate("100MiB/s") == 100 << 20
    assert parse_rate("0") is None
    assert parse_rate("unlimited") is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("300ms", 0.3), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5)]
)
def test_durations_need_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["300", "2", "s", "2 days", ""])
def test_durations_without_unit_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="unit is required"):
        parse_duration(text)


def test_human_sizes_use_binary_units() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3.0 GiB"


def test_sizes_with_decimals_are_exact() -> None:
    assert parse_size("1.1G") == 1_100_000_000  # not a float near it, refused as "not a whole number"
    assert parse_size("0.5KiB") == 512


@pytest.mark.parametrize("text", ["9" * 400, "9223372036854775808", "8EiB", "99999999T", "1" + "0" * 39 + ".5"])
def test_sizes_and_rates_beyond_the_maximum_are_value_errors_not_overflows(text: str) -> None:
    for parse in (parse_size, parse_rate):
        with pytest.raises(ValueError, match="invalid size") as info:
            parse(text)
        assert len(str(info.value)) < 160, "a huge value is not echoed whole"


def test_the_largest_size_and_rate_are_accepted() -> None:
    assert parse_size(str(2**63 - 1)) == 2**63 - 1
    assert parse_rate(f"{2**63 - 1}/s") == 2**63 - 1


@pytest.mark.parametrize("text", ["99999999999999h", "9" * 400 + "s", "8761h", "1" + "0" * 310 + "ms"])
def test_durations_beyond_a_year_are_value_errors(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_a_year_is_the_longest_duration() -> None:
    assert parse_duration("8760h") == 365 * 24 * 3600


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100Mbit", 12_500_000),
        ("100Mbit/s", 12_500_000),
        ("100Mbps", 12_500_000),
        ("10Gbit", 1_250_000_000),
        ("8Kbit", 1000),
        ("1Tbit", 125_000_000_000),
        ("800bps", 100),
        ("64bit/s", 8),
        ("1Mibit", 1 << 17),
        ("1.5Mbit", 187_500),
    ],
)
def test_rates_also_accept_bits_per_second(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


def test_a_capital_b_before_ps_is_bytes_per_second() -> None:
    assert parse_rate("100MBps") == 100_000_000
    assert parse_rate("100MiBps") == 100 << 20


@pytest.mark.parametrize(
    ("text", "bytes_form", "bits_form"),
    [
        ("100Mb", "100MB", "100Mbit"),
        ("1Gb", "1GB", "1Gbit"),
        ("10Kb", "10KB", "10Kbit"),
        ("1Mib", "1MiB", "1Mibit"),
        ("100mb", "100MB", "100Mbit"),
        ("100Mb/s", "100MB/s", "100Mbit/s"),
    ],
)
def test_a_lowercase_b_after_a_prefix_is_refused_naming_both_readings(
    text: str, bytes_form: str, bits_form: str
) -> None:
    with pytest.raises(ValueError, match=f"write {bytes_form} for bytes or {bits_form} for bits"):
        parse_rate(text)


@pytest.mark.parametrize("text", ["4Kbit", "1Mbit", "4Kb", "1Mib", "4kb"])
def test_sizes_refuse_bits(text: str) -> None:
    with pytest.raises(ValueError, match="bits are for rates only"):
        parse_size(text)


def test_a_bit_rate_that_is_not_a_whole_number_of_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_rate("1bps")


def test_ps_alone_is_not_a_unit() -> None:
    with pytest.raises(ValueError, match="needs a unit"):
        parse_rate("100ps")


def test_a_plain_b_still_means_bytes() -> None:
    assert parse_size("10b") == 10
    assert parse_rate("10b/s") == 10
