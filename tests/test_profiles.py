"""HeadProfile parsing is strict: a bad profile is a ValueError that says what is wrong and what to change."""

import json
import os
import pickle
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flexicache_hf.profiles import HeadProfile
from flexicache_hf.profiles_registry import list_profiles, load_shipped

GOOD = {"num_layers": 2, "num_kv_heads": 2, "unstable": [[0, 1]], "model_id": "x/y"}


def write(tmp_path, data, name="p.json"):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def assert_load_rejects(path, match=""):
    # The message must name the file and the expected shape, not just repeat a parser's complaint.
    with pytest.raises(ValueError, match=match) as err:
        HeadProfile.load(path)
    assert str(path) in str(err.value)
    assert "num_layers, num_kv_heads, unstable" in str(err.value)


# ---- entries of `unstable` ------------------------------------------------------------------------


def test_float_entries_are_rejected():
    # int(0.5) == 0 used to turn a typo into a different head
    with pytest.raises(ValueError, match=r"whole number.*0\.5"):
        HeadProfile(2, 2, [(0.5, 1)])
    with pytest.raises(ValueError, match="whole number"):
        HeadProfile(2, 2, [(1.0, 1)])


def test_bool_entries_are_rejected():
    with pytest.raises(ValueError, match="True"):
        HeadProfile(2, 2, [(True, 0)])


def test_string_entries_are_rejected():
    with pytest.raises(ValueError, match="'1'"):
        HeadProfile(2, 2, [("0", "1")])
    # "01" unpacks to ("0", "1"): it must not pass for the pair (0, 1)
    with pytest.raises(ValueError, match="'01'"):
        HeadProfile(2, 2, ["01"])


def test_numpy_ints_are_accepted():
    p = HeadProfile(np.int64(2), np.int32(2), [(np.int64(1), np.int8(0))])
    assert (p.num_layers, p.num_kv_heads, p.unstable) == (2, 2, [(1, 0)])
    assert all(type(x) is int for x in (p.num_layers, p.num_kv_heads, *p.unstable[0]))  # JSON-writable


@pytest.mark.parametrize("value", [2.7, 2.0, "2", True])
def test_non_int_sizes_in_json_are_rejected(tmp_path, value):
    assert_load_rejects(write(tmp_path, json.dumps({**GOOD, "num_layers": value})), match="num_layers")


@pytest.mark.parametrize("value", [None, "01", 3, {"0": 1}])
def test_unstable_that_is_not_a_list_is_rejected(tmp_path, value):
    # None used to be a bare TypeError; a dict or a string iterated into nonsense pairs
    assert_load_rejects(write(tmp_path, json.dumps({**GOOD, "unstable": value})), match=r"list of \[layer, kv_head\]")
    with pytest.raises(ValueError, match=r"list of \[layer, kv_head\] pairs"):
        HeadProfile(2, 2, value)


# ---- files that are not JSON profiles ---------------------------------------------------------------


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_in_json_is_rejected(tmp_path, constant):
    text = json.dumps(GOOD)[:-1] + f', "recall": {constant}}}'
    assert_load_rejects(write(tmp_path, text), match="NaN|Infinity|finite")


def test_binary_file_is_rejected(tmp_path):
    assert_load_rejects(write(tmp_path, bytes(range(256))), match="UTF-8")


class _Touch:
    """Unpickling this creates a file: the proof that load() never unpickles."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_file_is_rejected(tmp_path):
    marker = tmp_path / "unpickled"
    path = write(tmp_path, pickle.dumps({**GOOD, "hook": _Touch(marker)}), "p.pkl")
    assert_load_rejects(path, match="pickle")
    assert not marker.exists()


def test_directory_is_rejected(tmp_path):
    assert_load_rejects(tmp_path, match="directory")


def test_deep_nesting_is_rejected(tmp_path):
    # the json module recurses per level: without a guard this is a RecursionError
    text = json.dumps(GOOD)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert_load_rejects(write(tmp_path, text), match="nested")


@pytest.mark.parametrize("text", ["null", "42", "[1, 2]", '"num_layers num_kv_heads unstable"'])
def test_json_that_is_not_an_object_is_rejected(tmp_path, text):
    assert_load_rejects(write(tmp_path, text), match="JSON object")


def test_missing_file_is_a_file_not_found_error_naming_the_path(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        HeadProfile.load(path)


# ---- paths ------------------------------------------------------------------------------------


def test_path_objects_are_accepted(tmp_path):
    p = HeadProfile(2, 2, [(1, 0)], {"model_id": "x/y"})
    p.save(tmp_path / "a.json")
    p.save(str(tmp_path / "b.json"))
    for q in (HeadProfile.load(tmp_path / "a.json"), HeadProfile.load(str(tmp_path / "b.json"))):
        assert q.to_dict() == p.to_dict()


def test_path_object_as_the_cache_profile_argument(tmp_path):
    from flexicache_hf.cache import resolve_profile

    HeadProfile(2, 2, [(1, 0)]).save(tmp_path / "p.json")
    prof = resolve_profile(tmp_path / "p.json", SimpleNamespace(_name_or_path=""), 2, 2)
    assert prof.unstable == [(1, 0)]


# ---- save ---------------------------------------------------------------------------------------


def test_save_with_unserialisable_metadata_leaves_no_file(tmp_path):
    p = HeadProfile(2, 2, [], {"model_id": "x/y", "started": object()})
    with pytest.raises(ValueError, match="'started'"):
        p.save(tmp_path / "p.json")
    assert os.listdir(tmp_path) == []  # neither the profile nor a temporary file


def test_save_with_nan_metadata_is_rejected(tmp_path):
    # NaN is not JSON: a file holding it could not be loaded again
    p = HeadProfile(2, 2, [], {"recall": float("nan")})
    with pytest.raises(ValueError, match="'recall'"):
        p.save(tmp_path / "p.json")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "p.json"
    HeadProfile(2, 2, [(0, 1)]).save(path)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        HeadProfile(2, 2, [], {"started": object()}).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.json"]


# ---- metadata -----------------------------------------------------------------------------------


def test_metadata_cannot_override_required_keys():
    for key in ("num_layers", "num_kv_heads", "unstable"):
        with pytest.raises(ValueError, match=f"'{key}'"):
            HeadProfile(2, 2, [(0, 1)], {key: 1})


def test_required_keys_win_over_metadata_set_later():
    p = HeadProfile(2, 2, [(0, 1)])
    p.metadata.update(num_layers=5, unstable=[])  # metadata is a plain dict: it can still be edited
    d = p.to_dict()
    assert (d["num_layers"], d["unstable"]) == (2, [[0, 1]])
    assert list(d)[:3] == ["num_layers", "num_kv_heads", "unstable"]  # files keep the required keys first


@pytest.mark.parametrize("metadata", [["model_id"], None, {1: "x"}])
def test_metadata_must_be_a_dict_with_str_keys(metadata):
    with pytest.raises(ValueError, match="metadata"):
        HeadProfile(2, 2, [], metadata)


# ---- valid profiles keep working --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(list_profiles()))
def test_every_shipped_profile_loads(name):
    p = load_shipped(name)
    assert p.unstable and p.model_id
    assert HeadProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_shipped_profiles_load_from_their_files(tmp_path):
    # the same files through load(), the path users take when they copy one
    folder = Path(__file__).resolve().parent.parent / "profiles"
    for path in sorted(folder.glob("*.json")):
        assert HeadProfile.load(path) == load_shipped(path.name)
