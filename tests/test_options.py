"""Comma-list settings: ``parse_int_list`` (layers, ks) and ``parse_str_list`` (hooks); errors name the setting."""

import pytest

from mdiff.errors import MdiffError
from mdiff.options import parse_int_list, parse_str_list


@pytest.mark.parametrize("text, expected", [
    ("0,2,4", [0, 2, 4]),
    ("4,2,0", [0, 2, 4]),           # sorted
    ("2,2,1,2", [1, 2]),            # de-duplicated
    (" 1 , 3 ", [1, 3]),            # spaces
    ("1-3", [1, 2, 3]),             # inclusive range
    ("0:2,5", [0, 1, 2, 5]),        # a:b range, mixed with items
    ("3-3", [3]),
    ("1-3,2-4", [1, 2, 3, 4]),      # overlapping ranges merged
    ("ALL", [0, 1, 2, 3, 4, 5]),    # case-insensitive
    ("all", [0, 1, 2, 3, 4, 5]),
])
def test_parse_int_list_values(text, expected):
    assert parse_int_list(text, "layers", 0, 5, allow_all=True, what="layer") == expected


def test_parse_int_list_all_respects_bounds():
    assert parse_int_list("all", "ks", 1, 4, allow_all=True) == [1, 2, 3, 4]


@pytest.mark.parametrize("text, lo, hi, allow_all, needles", [
    ("0", 1, 32, False, ["ks: ", "0", "out of range 1..32"]),          # below the range
    ("1,99", 0, 5, True, ["ks: ", "99", "out of range 0..5"]),          # beyond the range
    ("4-9", 0, 5, True, ["'4-9'", "outside", "0..5"]),                  # a range reaching beyond
    ("0-1000000000000", 0, 5, True, ["outside", "0..5"]),              # never expanded
    ("-1", 0, 5, True, ["-1", "out of range"]),
    ("a", 0, 5, True, ["'a'", "not a whole number"]),
    ("1,x-3", 0, 5, True, ["'x-3'", "not a number or a range"]),
    ("1,,2", 0, 5, True, ["empty item"]),
    ("1,", 0, 5, True, ["empty item"]),
    ("", 0, 5, True, ["ks is empty", "or all"]),
    ("   ", 0, 5, False, ["ks is empty"]),
    ("all", 0, 5, False, ["does not take 'all'"]),
    ("3-1", 0, 5, True, ["range '3-1' is empty"]),
])
def test_parse_int_list_errors(text, lo, hi, allow_all, needles):
    with pytest.raises(MdiffError) as ei:
        parse_int_list(text, "ks", lo, hi, allow_all=allow_all)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_parse_int_list_names_what():
    with pytest.raises(MdiffError, match=r"^layers: layer 6 is out of range 0\.\.5"):
        parse_int_list("6", "layers", 0, 5, allow_all=True, what="layer")


HOOKS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z")


def test_parse_str_list_keeps_order_and_drops_duplicates():
    assert parse_str_list("z,resid_post", "hooks", HOOKS) == ["z", "resid_post"]
    assert parse_str_list(" resid_post , z ,resid_post", "hooks", HOOKS) == ["resid_post", "z"]
    assert parse_str_list("mlp_out,", "hooks", HOOKS) == ["mlp_out"]  # trailing comma tolerated


@pytest.mark.parametrize("text, needles", [
    ("resid", ["hooks: unknown 'resid'", "resid_pre, resid_post, attn_out, mlp_out, z"]),
    ("z,Resid_post", ["unknown 'Resid_post'"]),  # case matters: hook names are exact
    ("", ["hooks is empty"]),
    (" , ", ["hooks is empty"]),
])
def test_parse_str_list_errors(text, needles):
    with pytest.raises(MdiffError) as ei:
        parse_str_list(text, "hooks", HOOKS)
    for n in needles:
        assert n in str(ei.value)
    assert ei.value.option == "hooks"


def test_a_flag_spelling_is_kept_as_the_setting_name_and_rendered_back():
    """The CLI passes its flag; the error carries the setting name, and rendering shows the flag again."""
    with pytest.raises(MdiffError) as ei:
        parse_int_list("9", "--control-layer", 0, 5, what="layer")
    assert ei.value.option == "control_layer"
    assert str(ei.value) == "control_layer: layer 9 is out of range 0..5"
    assert ei.value.render(lambda o: "--" + o.replace("_", "-")) == "--control-layer: layer 9 is out of range 0..5"
