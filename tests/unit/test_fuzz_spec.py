"""Property: whatever YAML and flags a user writes, `launcher spec/config/estimate` answer 0 or 2,
never a traceback. Runs the real `main()` in-process (exit code and stderr as a user sees them)."""

from __future__ import annotations

import contextlib
import io
import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cli import main
from launcher.config.spec import RunSpec

SECTIONS = {name: sorted(f.annotation.model_fields) if hasattr(f.annotation, "model_fields") else None
            for name, f in RunSpec.model_fields.items()}
HOSTILE = ["x'; touch /tmp/p #", "$(id)", "`id`", "a\nb", ";", "..", "/", "", " ", "\x00", "🚀", "1e-4", "24:00:00",
           "-1", "nan", "inf", "None", "~", "*", "&a", "!!python/object:os.system"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(HOSTILE), st.text(string.printable, max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(string.ascii_lowercase, max_size=6),
                                                                       inner, max_size=3)), max_leaves=6)


@st.composite
def spec_trees(draw):
    tree = {}
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS) + ["bogus"]), max_size=5, unique=True)):
        keys = SECTIONS.get(section)
        if keys is None or draw(st.booleans()) and draw(st.booleans()):
            tree[section] = draw(values)
        else:
            sub = {}
            for key in draw(st.lists(st.sampled_from(keys + ["bogus_key"]), max_size=4, unique=True)):
                sub[key] = draw(values)
            tree[section] = sub
    return tree


FLAGS = {"--zero": st.sampled_from(["0", "1", "2", "3", "4", "-1", "x"]),
         "--precision": st.sampled_from(["bf16", "fp16", "fp32", "fp8"]),
         "--micro-batch": st.sampled_from(["1", "2", "3", "0", "-5", "1e3"]),
         "--global-batch": st.sampled_from(["1", "7", "64", "0", "huge"]),
         "--nproc": st.sampled_from(["1", "2", "3", "0"]), "--gpus-per-node": st.sampled_from(["0", "2", "8", "99"]),
         "--offload-param": st.sampled_from(["none", "cpu", "nvme", "disk"]),
         "--offload-optimizer": st.sampled_from(["none", "cpu", "nvme"]),
         "--lr": st.sampled_from(["1e-4", "0", "-1", "abc"]), "--seq-len": st.sampled_from(["8", "64", "4096", "0"]),
         "--method": st.sampled_from(["full", "lora", "qlora", "dora"]),
         "--set": st.sampled_from(["optim.lr=1e-3", "zero.stage=3", "x=1", "cluster.time=24:00:00", "bad",
                                   "method.lora.target_modules=[q_proj]", "zero.extra={fp16: {enabled: true}}",
                                   "cluster.env={A: $(id)}", "data.seq_len=999999999"])}


@st.composite
def flag_lists(draw):
    out = []
    for flag in draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=5)):
        out += [flag, draw(FLAGS[flag])]
    return out


def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            return exc.code, err.getvalue()
    return 0, err.getvalue()


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(tree=spec_trees(), flags=flag_lists(), command=st.sampled_from(["spec", "config", "estimate"]),
       raw=st.one_of(st.none(), st.text(max_size=40)))
def test_any_spec_and_flags_exit_0_or_2_without_traceback(tmp_path_factory, tree, flags, command, raw):
    path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    try:
        text = raw if raw is not None else yaml.safe_dump(tree, allow_unicode=True)
    except yaml.YAMLError:
        text = "{}"
    path.write_bytes(text.encode("utf-8", errors="replace"))
    code, err = run([command, str(path), *flags])
    assert code in (0, 2), f"exit {code} for {command} {flags}\n{text}\n{err}"
    assert "Traceback" not in err, err
    if code == 2:
        assert err.strip(), "exit 2 must say why"
