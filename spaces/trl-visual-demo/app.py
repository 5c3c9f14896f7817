"""trl_visual, live on a CPU: train GRPO, BPGO or ViPO on the miniature world and watch it learn.

A Gradio app for a free CPU Space (2 vCPU, 16 GB). The run is the library's own trainer (``make_demo_trainer``
builds a ``DiffusionGRPOTrainer``, ``BPGOTrainer`` or ``ViPOTrainer`` on ``tiny:shapes``); a
``LiveProgressCallback`` streams its reward curve, samples, ViPO maps and BPGO weights here. Runs are bounded
in steps and time, and one runs at a time (a queue with concurrency 1). At the end the LoRA can be downloaded,
or pushed to the Hub as the visitor: with the Hub's login on a Space, with a pasted token when run locally.

Nothing piles up on the Space's disk: each run trains in a temporary folder that is deleted when the run ends
(finished, failed or abandoned); what the visitor may download or push (the LoRA, its model card and pictures,
about 2 MB) is kept in the session's memory (``gr.State``, dropped when the tab closes or after an hour),
and Gradio's own copies of served files are deleted after an hour (``delete_cache``). Error messages quote at
most ``ECHO_CHARS`` characters of what the visitor typed.

Run locally: ``python app.py`` (``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` choose where it listens).
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr
import pandas as pd
import torch
from gradio.utils import get_space
from huggingface_hub import CommitOperationAdd, HfApi
from PIL import Image

from trl_visual.demo import METHODS, LiveProgressCallback, LiveUpdate, make_demo_trainer
from trl_visual.miniature.scenes import PromptGrammarError, parse_prompt

# -- settings: the one place to change what the Space trains ---------------------------------------------------
#: config fields over ``trl_visual.demo.SHAPES_SETTINGS`` (which the notebooks share); e.g. {"learning_rate": 1e-4}
SETTINGS: dict[str, Any] = {}
#: the rewards a visitor may pick (registered names); ``shapes_adherence`` judges whether an image follows its prompt
REWARDS = ["shapes_adherence", "red_channel", "jpeg_compressibility"]
DEFAULT_PROMPTS = (
    "a red circle on the left\na blue square at the top\na big green triangle\na small yellow shape"
)
DEFAULT_STEPS = 20
#: bounds of one run on a free CPU Space
MAX_STEPS = 60
MAX_PROMPTS = 8
MAX_PROMPT_TEXT = 2000  # characters in the prompts box: 8 prompts of the grammar fit easily
TIME_LIMIT_S = 300
#: error messages quote at most this many characters of the visitor's input (and say how long it was)
ECHO_CHARS = 80
#: how long a finished run's files stay in the session's memory for download and push (seconds)
RUN_FILES_TTL_S = 3600
#: the first prompts are sampled every SAMPLE_EVERY steps (always from the same seed)
WATCHED_PROMPTS = 4
SAMPLE_EVERY = 5
#: how big the 32×32 samples are shown (nearest-neighbour upscaling keeps the pixels sharp)
DISPLAY_SIZE = 128

torch.set_num_threads(1)  # the miniature model runs fastest on one thread; the second vCPU serves the page


# -- input checks (before any model is loaded) -----------------------------------------------------------------
def quoted(value: Any, limit: int = ECHO_CHARS) -> str:
    """``value`` as an error message may quote it: its ``repr``, cut to ``limit`` characters with its length
    said when longer (a 10 MB prompt must not come back as a 10 MB error)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(value)
    return f"{text[:limit]!r}… ({len(text):,} characters)"


def check_request(method: str, reward: str, prompts_text: str, steps: Any) -> tuple[list[str], int]:
    """The prompts (one per line) and the step count, or a ``gr.Error`` naming what is wrong and the fix."""
    if method not in METHODS:
        raise gr.Error(f"Unknown method {quoted(method)}: pick one of {', '.join(METHODS)}.")
    if reward not in REWARDS:
        raise gr.Error(f"Unknown reward {quoted(reward)}: pick one of {', '.join(REWARDS)}.")
    if len(prompts_text or "") > MAX_PROMPT_TEXT:
        raise gr.Error(
            f"The prompts are {len(prompts_text):,} characters long ({quoted(prompts_text)}): this Space takes at "
            f"most {MAX_PROMPT_TEXT:,}, that is up to {MAX_PROMPTS} short prompts like 'a red circle on the left'."
        )
    prompts = [line.strip() for line in (prompts_text or "").splitlines() if line.strip()]
    if not prompts:
        raise gr.Error("No prompts: type at least one, one per line, e.g. 'a red circle on the left'.")
    if len(prompts) > MAX_PROMPTS:
        raise gr.Error(
            f"{len(prompts)} prompts: this Space trains on at most {MAX_PROMPTS}; remove some lines."
        )
    for prompt in prompts:
        try:
            parse_prompt(prompt)
        except PromptGrammarError as error:
            raise gr.Error(f"The miniature model cannot read {quoted(prompt)}: {str(error)[:300]}") from error
    try:
        value = float(steps)
    except (TypeError, ValueError):
        value = float("nan")
    if not value.is_integer():
        raise gr.Error(f"Steps must be a whole number from 1 to {MAX_STEPS}, got {quoted(steps)}.")
    count = int(value)
    if not 1 <= count <= MAX_STEPS:
        raise gr.Error(
            f"{count} steps: a run here takes 1 to {MAX_STEPS} steps (a free CPU Space is shared). For longer runs "
            "use the quickstart notebook or `trl-visual grpo --model_name_or_path tiny:shapes`."
        )
    return prompts, count


# -- what the page shows ---------------------------------------------------------------------------------------
def _enlarged(image: Image.Image) -> Image.Image:
    scale = max(1, DISPLAY_SIZE // image.height)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def gallery_items(update: LiveUpdate) -> list[tuple[Image.Image, str]]:
    """The watched prompts' samples, captioned with the prompt, the reward and the step."""
    return [
        (_enlarged(image), f"{prompt} | reward {reward:.2f} | step {update.step}")
        for image, prompt, reward in zip(update.images, update.prompts, update.sample_rewards)
    ]


def reward_frame(update: LiveUpdate) -> pd.DataFrame:
    """The reward curve as the plot's data: the mean reward of each logged step."""
    return pd.DataFrame(update.rewards, columns=["step", "reward"])


def weights_frame(update: LiveUpdate) -> pd.DataFrame:
    """BPGO's latest RAS weight of each training prompt (> 1: the group beat its prior and counts more)."""
    rows = [
        (prompt, round(weight, 3))
        for prompt, weight in sorted(update.ras_weights.items(), key=lambda item: -item[1])
    ]
    return pd.DataFrame(rows, columns=["prompt", "RAS weight"])


def status_text(update: LiveUpdate, method: str) -> str:
    if not update.finished:
        last = f", reward {update.rewards[-1][1]:.3f}" if update.rewards else ""
        return f"**{method}**: step {update.step} of {update.max_steps}{last}"
    ending = f" ({update.stop_reason})" if update.stop_reason else ""
    return f"**{method}**: done after {update.step} steps{ending}. Download the LoRA below, or push it to the Hub."


# -- training --------------------------------------------------------------------------------------------------
def _train_and_save(trainer: Any, errors: list[BaseException]) -> None:
    """Train, then write the LoRA (diffusers' format) and its model card to ``output_dir``, even when stopped early."""
    try:
        trainer.train()
        trainer.save_model(trainer.args.output_dir)
        trainer.create_model_card()
    except BaseException as error:  # noqa: BLE001 - handed to the page, which shows it
        errors.append(error)


def run_files(output_dir: str) -> dict[str, bytes]:
    """What the visitor may download or push, read into memory before the run's folder is deleted: the files at
    the top of ``output_dir`` (the LoRA, its model card and the card's pictures, the training arguments, whose
    tokens are redacted)."""
    files = {}
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path) and not name.startswith((".", "_")):
            with open(path, "rb") as f:
                files[name] = f.read()
    return files


def train(
    method: str,
    reward: str,
    prompts_text: str,
    steps: Any,
    progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio is asked for a progress bar
) -> Iterator[tuple[Any, ...]]:
    """Train live: yields (status, samples, reward curve, ViPO maps, BPGO weights, LoRA file, run files).

    The run trains in a temporary folder, deleted when this generator ends: after the last yield (Gradio has then
    copied the LoRA it shows into its own cache), on an error, or when the visitor leaves (Gradio closes the
    generator). The run files (:func:`run_files`) stay in the session's state for :func:`push`."""
    prompts, steps = check_request(method, reward, prompts_text, steps)
    with tempfile.TemporaryDirectory(
        prefix=f"trl-visual-{method.lower()}-", ignore_cleanup_errors=True
    ) as output_dir:
        trainer = make_demo_trainer(method, prompts, output_dir, reward=reward, max_steps=steps, **SETTINGS)
        updates: queue.Queue[LiveUpdate] = queue.Queue()
        watcher = LiveProgressCallback(
            trainer,
            prompts[:WATCHED_PROMPTS],
            updates.put,
            sample_every=SAMPLE_EVERY,
            time_limit=TIME_LIMIT_S,
        )
        trainer.add_callback(watcher)
        errors: list[BaseException] = []
        worker = threading.Thread(target=_train_and_save, args=(trainer, errors), daemon=True)
        worker.start()
        shown = None
        try:
            while worker.is_alive() or not updates.empty():
                try:
                    update = updates.get(timeout=0.5)
                except queue.Empty:
                    continue
                progress((update.step, update.max_steps), desc="training", unit="steps")
                shown = (
                    status_text(update, method),
                    gallery_items(update),
                    reward_frame(update),
                    [(_enlarged(image), prompt) for image, prompt in zip(update.overlays, update.prompts)],
                    weights_frame(update),
                    None,
                    None,
                )
                yield shown
            worker.join()
        finally:  # the visitor left: end the run after the current step, before the next run and the clean-up
            watcher.request_stop()
            worker.join()
        if errors:
            raise gr.Error(f"Training failed: {type(errors[0]).__name__}: {str(errors[0])[:300]}")
        yield (
            *shown[:5],
            os.path.join(output_dir, "pytorch_lora_weights.safetensors"),
            run_files(output_dir),
        )


def on_hub() -> bool:
    """Whether the app runs as a Space on the Hub (``SPACE_ID``, as Gradio itself tells: ``gradio.utils.get_space``):
    there the visitor signs in with the Hub's login (OAuth, ``hf_oauth`` in the Space's README) instead of pasting a
    token. (Elsewhere Gradio's login button would stand in a mocked login of the machine's own Hub account.)"""
    return get_space() is not None


def push(
    files: dict[str, bytes] | None, repo_id: str, token: str, oauth_token: gr.OAuthToken | None = None
) -> str:
    """Upload the run's files (LoRA, model card and its pictures) to ``repo_id`` as the visitor: with the token of their Hub
    login on a Space (Gradio passes ``oauth_token`` to a parameter of that type), else with the token they pasted.
    The token is used for this upload only, in memory; it is never written anywhere."""
    if not files:
        raise gr.Error("Nothing to push yet: train first, then push.")
    repo_id = (repo_id or "").strip()
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise gr.Error(f"Repository {quoted(repo_id)}: write it as 'your-name/model-name'.")
    token = oauth_token.token if oauth_token is not None else (token or "").strip()
    if not token:
        raise gr.Error(
            "Not signed in: press 'Sign in with Hugging Face' above, then push."
            if on_hub()
            else "No token: paste a Hugging Face token with write access (huggingface.co/settings/tokens)."
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.create_commit(
            repo_id=repo_id,
            operations=[
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()
            ],
            commit_message="LoRA trained with trl_visual",
        )
    except Exception as error:  # noqa: BLE001 - shown to the visitor; the files stay downloadable
        raise gr.Error(
            f"Push failed ({type(error).__name__}: {str(error)[:300]}). The LoRA is still downloadable."
        ) from error
    return f"Pushed to https://huggingface.co/{repo_id}: load it with `pipe.load_lora_weights({repo_id!r})`."


# -- the page --------------------------------------------------------------------------------------------------
def build_demo() -> gr.Blocks:
    # Gradio's copies of served files (a LoRA per run) are deleted every 10 minutes once an hour old
    with gr.Blocks(title="trl_visual: RL post-training, live", delete_cache=(600, RUN_FILES_TTL_S)) as demo:
        gr.Markdown(
            "# trl_visual: RL post-training of a diffusion model, live on a CPU\n"
            "A miniature pretrained SD3 (`tiny:shapes`, 32×32 images of one coloured shape) trained with "
            "[trl_visual](https://github.com/trl-visual/trl_visual)'s trainers. Pick a method, a reward and a few "
            "prompts (grammar: `a [small|big] [red|green|blue|yellow] (circle|square|triangle|shape) "
            "[on the left|on the right|at the top|at the bottom]`), then press Train. "
            f"At most {MAX_STEPS} steps and {TIME_LIMIT_S // 60} minutes per run; one run at a time."
        )
        with gr.Row():
            with gr.Column(scale=1):
                method = gr.Radio(list(METHODS), value="GRPO", label="Method", elem_id="method")
                reward = gr.Dropdown(REWARDS, value=REWARDS[0], label="Reward", elem_id="reward")
                prompts = gr.Textbox(
                    DEFAULT_PROMPTS, lines=5, label="Prompts (one per line)", elem_id="prompts"
                )
                steps = gr.Number(DEFAULT_STEPS, precision=0, label=f"Steps (1–{MAX_STEPS})", elem_id="steps")
                start = gr.Button("Train", variant="primary", elem_id="train")
            with gr.Column(scale=2):
                status = gr.Markdown("Press **Train** to start.", elem_id="status")
                samples = gr.Gallery(
                    label="Samples (same seeds every time)",
                    columns=4,
                    object_fit="contain",
                    elem_id="samples",
                )
                curve = gr.LinePlot(x="step", y="reward", title="Mean reward per step", elem_id="curve")
        with gr.Row():
            maps = gr.Gallery(
                label="ViPO: samples and their perceptual maps",
                columns=2,
                object_fit="contain",
                elem_id="maps",
            )
            weights = gr.Dataframe(label="BPGO: RAS weight per prompt", elem_id="weights")
        with gr.Row():
            lora = gr.File(label="LoRA (diffusers format: pipe.load_lora_weights)", elem_id="lora")
            files = gr.State(None, time_to_live=RUN_FILES_TTL_S)
            with gr.Column():
                repo_id = gr.Textbox(label="Hub repository", placeholder="your-name/tiny-shapes-grpo")
                if on_hub():  # the Hub's login; locally, a pasted token
                    gr.LoginButton(elem_id="login")
                token = gr.Textbox(
                    label="Hugging Face token (write)", type="password", visible=not on_hub(), elem_id="token"
                )
                push_button = gr.Button("Push to the Hub")
                pushed = gr.Markdown()
        start.click(
            train,
            [method, reward, prompts, steps],
            [status, samples, curve, maps, weights, lora, files],
            concurrency_limit=1,
            concurrency_id="train",
        )
        push_button.click(push, [files, repo_id, token], pushed)
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


if __name__ == "__main__":
    build_demo().launch()
