import json
from dataclasses import dataclass

import pytest

import longkit
from longkit.errors import MethodError
from longkit.methods import Method
from longkit.registry import KINDS, REGISTRIES, Registry, param, params_of, split_spec


def test_every_kind_has_a_registry():
    assert set(REGISTRIES) == set(KINDS) == {"rope", "attention", "kv", "memory"}
    assert {"default", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3", "abf"} <= set(REGISTRIES["rope"].names())
    assert {"eager", "sdpa"} <= set(REGISTRIES["attention"].names())


def test_split_spec_handles_lists_and_types():
    assert split_spec("yarn") == ("yarn", {})
    assert split_spec("yarn:factor=2,beta_fast=16") == ("yarn", {"factor": "2", "beta_fast": "16"})
    name, args = split_spec("longrope:short_factor=[1,1.5,2],factor=4")
    assert name == "longrope" and args == {"short_factor": "[1,1.5,2]", "factor": "4"}
    with pytest.raises(MethodError, match="not key=value"):
        split_spec("yarn:factor")


def test_cli_strings_are_coerced_to_declared_types():
    m = REGISTRIES["rope"].create("yarn", {"factor": "4", "truncate": "false", "original_max_position_embeddings": "8k"})
    assert m.factor == 4.0 and isinstance(m.factor, float)
    assert m.truncate is False
    assert m.original_max_position_embeddings == 8192
    lr = REGISTRIES["rope"].create("longrope", {"short_factor": "1;2", "long_factor": "[1, 3]"})
    assert lr.short_factor == [1.0, 2.0] and lr.long_factor == [1.0, 3.0]


@pytest.mark.parametrize(
    "name,args,match",
    [
        ("yarn", {"factor": "0.5"}, r"'factor' must be >= 1.0 \(got 0.5\)"),
        ("yarn", {"beta_fast": "0"}, r"'beta_fast' must be > 0"),
        ("yarn", {"factor": "big"}, r"'factor' expects float, got 'big'"),
        ("yarn", {"fctor": "2"}, r"no parameter 'fctor'; valid parameters: .*factor"),
        ("llama3", {"low_freq_factor": "4", "high_freq_factor": "1"}, r"low_freq_factor' must be < high_freq_factor"),
        ("dynamic", {"original_max_position_embeddings": "-3"}, r"must be > 0"),
    ],
)
def test_bad_parameters_name_the_parameter_and_range(name, args, match):
    with pytest.raises(MethodError, match=match):
        REGISTRIES["rope"].create(name, args)


def test_unknown_method_lists_valid_names():
    with pytest.raises(MethodError) as err:
        REGISTRIES["rope"].get("yarnn")
    assert "valid rope methods: abf, default, dynamic, linear, llama3, longrope, ntk, yarn" in str(err.value)


def test_describe_lists_parameters_defaults_ranges_and_paper():
    for kind, reg in REGISTRIES.items():
        for name in reg.names():
            d = reg.get(name).describe()
            assert d["name"] == name and d["kind"] == kind
            assert d["paper"].startswith(tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")) and "http" in d["paper"], name
            json.dumps(d)
    yarn = {p["name"]: p for p in REGISTRIES["rope"].get("yarn").describe()["parameters"]}
    assert yarn["factor"]["default"] == 2.0 and yarn["factor"]["ge"] == 1.0
    assert yarn["beta_fast"]["gt"] == 0


def test_register_rejects_a_second_class_under_one_name():
    reg = Registry("rope")

    @reg.register("x")
    @dataclass
    class A(Method):
        pass

    with pytest.raises(MethodError, match="already registered"):

        @reg.register("x")
        @dataclass
        class B(Method):
            pass


def test_param_choices_and_label():
    reg = Registry("kv")

    @reg.register("toy")
    @dataclass
    class Toy(Method):
        mode: str = param("a", choices=("a", "b"))
        ratio: float = param(0.5, gt=0, lt=1)

    assert [p.name for p in params_of(Toy)] == ["mode", "ratio"]
    with pytest.raises(MethodError, match=r"'mode' must be one of 'a', 'b'"):
        reg.create("toy", {"mode": "c"})
    with pytest.raises(MethodError, match=r"'ratio' must be > 0 and < 1"):
        reg.create("toy", {"ratio": "1"})
    assert reg.create("toy", {}).label() == "toy"
    assert reg.create("toy", {"ratio": "0.25"}).label() == "toy:ratio=0.25"


def test_labels_round_trip_through_the_parser():
    spec = longkit.MethodSpec.parse("rope=yarn:factor=4,beta_fast=16+attention=eager")
    again = longkit.MethodSpec.parse(spec.label())
    assert again == spec
    assert spec.label() == "rope=yarn:factor=4,beta_fast=16+attention=eager"
    assert longkit.MethodSpec.parse("baseline").label() == "baseline"
    # the kind may be left out when the name is unambiguous
    assert longkit.MethodSpec.parse("yarn:factor=3").rope.factor == 3.0
    with pytest.raises(MethodError, match="two rope methods"):
        longkit.MethodSpec.parse("rope=yarn+rope=linear")


def test_one_registry_class_serves_functions_and_tables_with_clear_errors():
    from longkit.errors import EvalError

    reg = Registry("remap", "position remap", plural="remaps", error=EvalError)

    def b(length):
        return length

    def a(length):
        return length

    assert reg.register("b")(b) is b and reg.add("a", a) is a and reg.add("none", None) is None
    # registration order when iterated (as a dict), sorted names in listings; functions are not stamped
    assert list(reg) == ["b", "a", "none"] and reg.names() == ["a", "b", "none"] and len(reg) == 3
    assert reg["a"] is a and reg.get("none") is None and "b" in reg and "c" not in reg and not hasattr(a, "kind")
    assert reg.items() == [("b", b), ("a", a), ("none", None)]
    with pytest.raises(EvalError, match=r"^unknown position remap 'c'; valid remaps: a, b, none$"):
        reg["c"]
    with pytest.raises(EvalError, match=r"^position remap 'a' is already registered by <function"):
        reg.add("a", b)
    reg.add("a", a)  # the same object again is no error (a module imported twice)
    reg.unregister("a")
    assert reg.names() == ["b", "none"]
    with pytest.raises(MethodError, match=r"^unknown kv method 'x'; valid kv methods: \(none\)$"):
        Registry("kv").get("x")


def test_every_registry_is_a_registry():
    from longkit.attention.minference import PATTERNS
    from longkit.eval.suites import SUITES
    from longkit.eval.tasks import TASKS
    from longkit.rope import FREQUENCIES, REMAPS

    for reg in (*REGISTRIES.values(), FREQUENCIES, REMAPS, PATTERNS, TASKS, SUITES):
        assert isinstance(reg, Registry)
    assert list(PATTERNS) == ["a_shape", "vertical_slash", "block_sparse", "dense"]
