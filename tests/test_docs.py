"""The documentation builds without broken references, and documents every option."""

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import hub_connect_error, patch_hub_api

from trl_visual import DiffusionGRPOConfig
from trl_visual.cli import ModelArguments, ScriptArguments

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs and mkdocstrings are not installed (pip install -e '.[docs]'); the `test` extra installs them",
)
def test_docs_build_strict(tmp_path):
    """`mkdocs build --strict` fails on any warning: broken links or anchors, pages missing from the nav,
    API-reference objects that do not exist."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "api" / "index.html").read_text().count("compute_advantages") > 0


def _own_fields(config_class: type) -> list[str]:
    base = {f.name for f in dataclasses.fields(config_class.__mro__[1])}
    own = [f.name for f in dataclasses.fields(config_class) if f.name not in base]
    changed = [
        name for name in config_class.__dataclass_fields__ if name in vars(config_class) and name in base
    ]
    return own + changed


def test_grpo_page_lists_every_config_field():
    page = (DOCS / "grpo.md").read_text()
    missing = [name for name in _own_fields(DiffusionGRPOConfig) if not re.search(rf"`{name}`", page)]
    assert not missing, f"docs/grpo.md does not document: {missing}"


def test_cli_page_lists_every_flag():
    page = (DOCS / "cli.md").read_text()
    flags = [f.name for cls in (ScriptArguments, ModelArguments) for f in dataclasses.fields(cls)]
    missing = [name for name in flags if f"--{name}" not in page]
    assert not missing, f"docs/cli.md does not document: {missing}"


def readme_python_blocks() -> list[str]:
    """The Python blocks of the README's "From Python" section, in order."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## From Python") : readme.index("## Demos")]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_readme_from_python_runs_the_recipe_and_says_why_a_push_failed(tmp_path, monkeypatch, capsys):
    """The README's "From Python" example as a user runs it, shortened to 2 steps (evaluated at both ends) and with
    the Hub unreachable: it trains the tiny:shapes recipe (the config the command uses), prints the evaluation
    before -> after, saves a pipeline that ``DiffusionPipeline.from_pretrained`` loads, and the push ends in one
    ``HubPushError`` that says the repository could not be created and where the trained model is, never that
    nothing was trained."""
    from diffusers import DiffusionPipeline

    from trl_visual.miniature import GRPO_DEFAULTS
    from trl_visual.trainer.model_card import HubPushError

    def unreachable(self, repo_id, **kwargs):
        raise hub_connect_error()

    patch_hub_api(monkeypatch, "create_repo", unreachable)
    code = readme_python_blocks()[0]
    out = tmp_path / "tiny-shapes-grpo"
    short = f"output_dir={str(out)!r}, max_steps=2, eval_steps=2, per_device_train_batch_size=16, disable_tqdm=True,"
    assert 'output_dir="tiny-shapes-grpo",' in code
    namespace: dict = {}
    with pytest.raises(HubPushError) as raised:
        exec(compile(code.replace('output_dir="tiny-shapes-grpo",', short), "README.md", "exec"), namespace)
    message = str(raised.value)
    assert "creating the repository failed: ConnectError" in message and str(out) in message
    assert "Nothing has been trained" not in message

    args = namespace["trainer"].args
    recipe = (
        "learning_rate",
        "num_generations",
        "num_inference_steps",
        "guidance_scale",
        "timestep_fraction",
    )
    assert {name: getattr(args, name) for name in recipe} == {name: GRPO_DEFAULTS[name] for name in recipe}
    assert args.scale_rewards == "batch" and args.eval_on_start
    printed = capsys.readouterr().out
    assert re.search(r"^eval reward: 0\.\d{3} -> 0\.\d{3}$", printed, re.M), printed
    loaded = DiffusionPipeline.from_pretrained(str(out))
    assert type(loaded).__name__ == "StableDiffusion3Pipeline" and (out / "README.md").is_file()


def test_readme_lora_example_saves_a_lora_that_diffusers_loads(tmp_path, monkeypatch):
    """The README's second "From Python" block (a reward function of its own and a LoRA), run for one step without
    evaluation: its saved folder loads into a fresh tiny:shapes with ``load_lora_weights``."""
    from trl_visual.models.loading import load_pipeline

    monkeypatch.chdir(tmp_path)
    code = readme_python_blocks()[1]
    short = 'learning_rate=3e-4, max_steps=1, eval_strategy="no", eval_on_start=False, disable_tqdm=True)'
    assert "learning_rate=3e-4)," in code
    namespace: dict = {}
    exec("from trl_visual import DiffusionGRPOConfig, DiffusionGRPOTrainer\n", namespace)
    exec("from trl_visual.data import load_prompts\n", namespace)
    exec(compile(code.replace("learning_rate=3e-4)", short), "README.md", "exec"), namespace)
    assert namespace["trainer"].state.global_step == 1
    pipeline = load_pipeline("tiny:shapes")
    pipeline.load_lora_weights(str(tmp_path / "out" / "final"))
    assert any("lora" in name for name, _ in pipeline.transformer.named_parameters())
