"""The settings model (issue 18): one place per setting, from which the command line, pipeline blocks and a set's
identity derive; and the layering it makes possible (no import cycles, the data and store layers load no torch)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner
import pytest

from regcache.cli import main
from regcache.settings import ExtractSettings, Settings, cli, fields, meta

PACKAGE = Path(__file__).resolve().parents[1] / "regcache"
#: commands without options (listings)
WITHOUT_SETTINGS = {"scorers", "models"}
#: options of a command that start processes rather than configure the action
PROCESS_OPTIONS: dict[str, set[str]] = {}


def commands(group: click.Group = main, prefix: str = ""):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


@pytest.mark.parametrize("name, cmd", list(commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_option_is_a_settings_field_and_every_field_an_option(name, cmd):
    declared = getattr(cmd.callback, "__settings__", None)
    if declared is None:
        assert name in WITHOUT_SETTINGS, f"regcache {name} takes options that no settings model declares"
        return
    cls, _ = declared
    params = {p.name for p in cmd.params if p.name != "help"} - PROCESS_OPTIONS.get(name, set())
    assert params == set(fields(cls)), f"{name}: options without a field {params - set(fields(cls))}, fields " \
                                       f"without an option {set(fields(cls)) - params}"
    for p in cmd.params:  # the option's choices are the field's
        if isinstance(p.type, click.Choice) and p.name in cls.model_fields:
            from typing import get_args

            from regcache.cli.options import _bare

            assert list(p.type.choices) == [str(c) for c in get_args(_bare(cls.model_fields[p.name].annotation))]


def test_every_settings_model_is_some_commands():
    used = {getattr(c.callback, "__settings__", (None,))[0] for _, c in commands()}
    import regcache.settings as S

    actions = {getattr(S, n) for n in S.__all__ if n.endswith("Settings") and n != "Settings"}
    assert actions <= used, actions - used


def test_help_shows_each_fields_default_and_choices():
    text = " ".join(main.commands["probe"].get_help(click.Context(main.commands["probe"])).split())
    assert "[default: 4096]" in text and "[default: msp,energy,maxlogit]" in text and "[minibatch|lbfgs|sklearn]" in text
    assert "PydanticUndefined" not in text


def test_a_bad_option_is_named_as_the_user_typed_it():
    r = CliRunner().invoke(main, ["probe", "-m", "m", "--train", "t", "-f", "cls", "--lr", "0.1,inf",
                                                "--val-fraction", "2"])
    assert r.exit_code == 2 and "--lr[1]: Input should be a finite number" in r.output and \
        "--val-fraction: Input should be less than or equal to 0.5" in r.output, r.output


# --------------------------------------------------------------------------- one identity

def test_the_identity_has_every_identity_field_and_nothing_else(tmp_path):
    """A field marked as identity is in the set's identity (or folded into another entry); an unmarked one never
    is, whatever its value; and the backbone part is exactly the backbone-marked fields."""
    from conftest import REG, make_shards
    from regcache.identity import plan
    from regcache.settings import backbone

    data = make_shards(tmp_path / "s", n_shards=1, per_shard=2)
    s = ExtractSettings.make(model=REG, data=data, random_init=0, size=56, cache=tmp_path / "c")
    ident = plan(s).identity
    marked = set(fields(ExtractSettings, identity=("backbone", "rows")))
    folded = {"labels", "layers", "decode"}  # in the data's content id, in the features, PIL's decode is what sets
    assert set(ident) - {"schema"} == marked - folded  # had before the field (docs/design.md, "Identity")
    device = plan(s.model_copy(update={"decode": "device", "device": "cpu"})).identity
    assert device == {**ident, "decode": "device:libjpeg-turbo"}  # the decoder, as the pixels depend on it
    assert set(backbone(ident)) == set(fields(ExtractSettings, identity=("backbone",)))
    # settings that do not change a row change nothing in the identity
    other = s.model_copy(update={"batch_size": 3, "workers": 1, "device": "cpu", "unit_rows": 7, "compile": True,
                                 "quiet": False, "allow_pipe": True})
    assert plan(other).identity == ident
    assert plan(s.model_copy(update={"precision": "bf16"})).identity != ident


def test_the_pipeline_job_key_is_the_fingerprint_extract_writes(tmp_path, reg_ckpt):
    from conftest import REG, SIZE, make_shards
    from regcache.extract import extract
    from regcache.pipeline import load_pipeline
    from regcache.pipeline.jobs import extract_jobs

    make_shards(tmp_path / "s", n_shards=1, per_shard=2)
    (tmp_path / "m.yaml").write_text("name: m\nshards: s/part-000.tar\n")
    (tmp_path / "p.yaml").write_text(f"name: p\ncache: c\nmodels: [{{model: {REG}, checkpoint: {reg_ckpt}}}]\n"
                                     f"datasets: [m.yaml]\nextract: {{size: {SIZE}, workers: 0}}\n")
    (job,) = extract_jobs(load_pipeline(tmp_path / "p.yaml"))
    assert job.status == "to do"
    res = extract(job.settings)
    assert res.fingerprint == job.key
    (again,) = extract_jobs(load_pipeline(tmp_path / "p.yaml"))
    assert again.status == "cached" and again.path == str(res.path)


# --------------------------------------------------------------------------- layering

def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its file (top level or inside functions)."""
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])]) if node.level else node.module
            out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in modules and m not in (module, "regcache")}


def test_no_import_cycles():
    files = {}
    for p in PACKAGE.rglob("*.py"):
        parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            for n in graph[m] - seen:
                if n == goal:
                    return True
                seen.add(n)
                todo.append(n)
        return False

    cycles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, cycles


@pytest.mark.parametrize("code, absent", [
    ("import regcache.data", ("torch",)),
    ("import regcache.store", ("torch",)),
    ("import regcache.settings", ("torch", "timm")),
    ("import regcache.cli", ("torch", "timm", "regcache.models")),  # `regcache ls` and --help start fast
    # stage 2 reads the cache: nothing backbone-side (it reads manifests, so regcache.data is allowed)
    ("import regcache.probe, regcache.ood, regcache.report", ("timm", "regcache.models", "regcache.identity",
                                                             "regcache.extract", "regcache.tokens")),
    ("from regcache.pipeline import load_pipeline; load_pipeline('{root}/pipelines/registers-study.yaml', "
     "allow_unset=True)", ("torch", "timm", "regcache.extract", "regcache.models", "regcache.tokens")),
])
def test_lower_layers_load_no_torch_and_validating_a_pipeline_no_extraction_code(code, absent):
    root = PACKAGE.parent
    probe = f"import sys; {code.format(root=root)}; print([m for m in {absent!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_fields_know_where_they_may_be_given():
    """Every field has a scope and an identity mark of the known kinds, and every settings model refuses what it
    does not know (a misspelt pipeline field is an error, not a default)."""
    import regcache.settings as S

    for cls in (getattr(S, n) for n in S.__all__ if n.endswith("Settings") and n != "Settings"):
        assert issubclass(cls, Settings) and cls.model_config["extra"] == "forbid"
        for name in cls.model_fields:
            assert meta(cls, name).scope in ("any", "job", "cli") and cli(cls, name) is not None
            assert meta(cls, name).identity in (None, "backbone", "rows")
            assert cls.model_fields[name].description, f"{cls.__name__}.{name} has no help text"
