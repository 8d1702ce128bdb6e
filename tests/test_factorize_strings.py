"""The compiled factorization of short Arrow string columns (_kernels/_factorize.pyx)
against its twin through Python strings (sorted(set(...)) and a dict)."""
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from mixedmodels.formula._columns import (_arrow_strings_without_nulls, _sorted_string_codes,
                                          _sorted_string_codes_python)


def _cases():
    rng = np.random.default_rng(4)
    words = ["b", "a", "", "ab", "a\u00e9", "\u00e9", "\u4e2d\u6587", "a\x00b", "a\x00",
             "Z", "z", "10", "9", "\U0001f600", "ba"]
    yield "mixed", [words[i] for i in rng.integers(0, len(words), 300)]
    yield "many levels", [f"s{i}" for i in rng.permutation(400)] + ["s7", "s399"]
    yield "one value", ["x"] * 50
    yield "empty strings", [""] * 3 + ["a"] + [""]
    yield "prefixes", ["abc", "ab", "abcd", "a", "abc", "b"]


@pytest.mark.parametrize("name,values", list(_cases()))
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("sliced", [False, True])
def test_codes_and_levels_match_the_python_twin(name, values, wide, sliced):
    arr = pa.array(values, type=pa.large_string() if wide else pa.string())
    if sliced:                  # a chunk that starts inside its buffers
        arr = pa.concat_arrays([pa.array(["zz", "q"], type=arr.type), arr]).slice(2)
    data = pa.chunked_array([arr])
    codes, levels = _sorted_string_codes(data)
    want_codes, want_levels = _sorted_string_codes_python(data)
    assert levels == want_levels == sorted(set(values))
    assert codes.dtype == np.int32
    np.testing.assert_array_equal(codes, want_codes)
    assert [levels[c] for c in codes] == values


def test_a_pandas_arrow_column_takes_the_compiled_route():
    col = pd.Series(["b", "a", "b", "c"], dtype=pd.StringDtype("pyarrow"))
    data = _arrow_strings_without_nulls(col.array)
    assert data is not None and data.num_chunks == 1
    codes, levels = _sorted_string_codes(data)
    assert levels == ["a", "b", "c"] and codes.tolist() == [1, 0, 1, 2]


def test_several_chunks_take_the_python_route():
    data = pa.chunked_array([pa.array(["b", "a"]), pa.array(["c", "a"])])
    codes, levels = _sorted_string_codes(data)
    assert levels == ["a", "b", "c"] and codes.tolist() == [1, 0, 2, 0]


def test_offsets_outside_the_buffers_are_refused():
    import struct

    from mixedmodels._kernels._factorize import arrow_string_codes
    data = pa.array(["b", "a", "b"])
    _, offsets, values = data.buffers()
    good = arrow_string_codes(offsets.address, offsets.size, values.address, values.size,
                              0, 3, False)
    assert good[0].tolist() == [1, 0, 1] and good[1] == ["a", "b"]
    # more rows than the offsets hold, and offsets past the end of the data
    with pytest.raises(ValueError, match="shorter than the rows"):
        arrow_string_codes(offsets.address, offsets.size, values.address, values.size,
                           0, 4, False)
    bad = pa.py_buffer(struct.pack("4i", 0, 1, 9, 3))
    with pytest.raises(ValueError, match="outside the string data"):
        arrow_string_codes(bad.address, bad.size, values.address, values.size, 0, 3, False)
