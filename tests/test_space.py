"""The Gradio Space (``spaces/trl-visual-demo``) in a real browser: the app runs on 127.0.0.1, headless Chromium
(Debian's ``chromium`` and ``chromium-driver``, driven by Selenium) types prompts, presses Train and watches the run
to the end. Also the Space's input checks, without a browser."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SPACE = Path(__file__).resolve().parents[1] / "spaces" / "trl-visual-demo"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: bounds of the browser test (seconds): the app's start (imports torch, diffusers, gradio) and a 2-step run
START_TIMEOUT = 150
RUN_TIMEOUT = 240


def load_app():
    pytest.importorskip("gradio")
    spec = importlib.util.spec_from_file_location("trl_visual_space_app", SPACE / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- input checks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompts, steps, message",
    [
        ("", 5, "No prompts"),
        ("  \n \n", 5, "No prompts"),
        ("\n".join(["a red circle"] * 9), 5, "at most 8"),
        ("a purple elephant", 5, "cannot read 'a purple elephant'"),
        ("a red circle", 0, "1 to 60 steps"),
        ("a red circle", 61, "1 to 60 steps"),
        ("a red circle", 2.5, "whole number"),
        ("a red circle", None, "whole number"),
    ],
)
def test_bad_input_is_refused_with_the_fix(prompts, steps, message):
    app = load_app()
    import gradio as gr

    with pytest.raises(gr.Error, match=message):
        app.check_request("GRPO", "shapes_adherence", prompts, steps)


def test_good_input_is_read_line_by_line():
    app = load_app()
    prompts, steps = app.check_request(
        "BPGO", "shapes_adherence", " a red circle \n\na big blue square\n", 3.0
    )
    assert prompts == ["a red circle", "a big blue square"]
    assert steps == 3 and isinstance(steps, int)


def test_push_refuses_before_training_and_without_token(tmp_path):
    app = load_app()
    import gradio as gr

    with pytest.raises(gr.Error, match="train first"):
        app.push(None, "me/model", "hf_x")
    with pytest.raises(gr.Error, match="your-name/model-name"):
        app.push(str(tmp_path), "model", "hf_x")
    with pytest.raises(gr.Error, match="No token"):
        app.push(str(tmp_path), "me/model", "  ")


def test_push_uploads_the_run_files_with_the_visitors_token(monkeypatch):
    app = load_app()
    calls = []

    class FakeHub:  # records what the Space asks of huggingface_hub.HfApi (no network here)
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok):
            calls.append(("create_repo", repo_id, exist_ok))

        def create_commit(self, repo_id, operations, commit_message):
            files = {op.path_in_repo: op.path_or_fileobj for op in operations}
            calls.append(("create_commit", repo_id, files))

    monkeypatch.setattr(app, "HfApi", FakeHub)
    files = {"pytorch_lora_weights.safetensors": b"lora", "README.md": b"card"}
    message = app.push(files, " me/tiny-shapes ", " hf_secret ")
    assert calls == [
        ("token", "hf_secret"),
        ("create_repo", "me/tiny-shapes", True),
        ("create_commit", "me/tiny-shapes", files),
    ]
    assert "load_lora_weights('me/tiny-shapes')" in message


# -- what a visitor types is never echoed back whole ----------------------------------------------------------
def test_a_10_mb_prompt_is_refused_in_a_short_message():
    app = load_app()
    import gradio as gr

    text = "a red circle " + "x" * (10 * 2**20)
    with pytest.raises(gr.Error) as error:
        app.check_request("GRPO", "shapes_adherence", text, 5)
    message = str(error.value.message)
    assert len(message) < 400, len(message)
    assert f"{len(text):,} characters" in message and "'a red circle xxx" in message


@pytest.mark.parametrize("field", ["prompt", "method", "reward", "steps", "repo"])
def test_long_input_is_quoted_at_most_80_characters(field):
    app = load_app()
    import gradio as gr

    long = "a purple elephant " * 60  # 1,080 characters: under the box's bound, over the quote's
    arguments = {"method": "GRPO", "reward": "shapes_adherence", "prompts": long[:1000], "steps": 5}
    if field != "prompt":
        arguments["prompts"] = "a red circle"
        arguments[{"repo": "method"}.get(field, field)] = long
    with pytest.raises(gr.Error) as error:
        if field == "repo":
            app.push({"README.md": b"card"}, long, "hf_x")
        else:
            app.check_request(*arguments.values())
    message = str(error.value.message)
    assert len(message) < 500 and "characters)" in message, message


# -- nothing piles up on the Space's disk ---------------------------------------------------------------------
@pytest.fixture
def run_dirs(tmp_path, monkeypatch):
    """Runs' temporary folders go under ``tmp_path/tmp``; returns that folder."""
    import tempfile

    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_a_run_folder_is_deleted_after_the_run_and_its_files_kept_in_memory(run_dirs):
    app = load_app()
    outputs = list(app.train("GRPO", "shapes_adherence", "a red circle on the left", 1))
    *_, lora, files = outputs[-1]
    assert list(run_dirs.iterdir()) == []  # the run's folder is gone...
    assert lora.startswith(str(run_dirs)) and not os.path.exists(lora)
    from safetensors.torch import load

    assert any(
        "lora" in key for key in load(files["pytorch_lora_weights.safetensors"])
    )  # ...its files are not
    assert "README.md" in files and not any(name.startswith("_") for name in files)


def test_a_failed_or_abandoned_run_leaves_no_folder(run_dirs, monkeypatch):
    app = load_app()
    import gradio as gr

    built = app.make_demo_trainer

    def failing(*args, **kwargs):
        trainer = built(*args, **kwargs)
        trainer.train = lambda: (_ for _ in ()).throw(RuntimeError("reward server down"))
        return trainer

    monkeypatch.setattr(app, "make_demo_trainer", failing)
    with pytest.raises(gr.Error, match="reward server down"):
        list(app.train("GRPO", "shapes_adherence", "a red circle", 1))
    assert list(run_dirs.iterdir()) == []

    monkeypatch.setattr(app, "make_demo_trainer", built)
    run = app.train("GRPO", "shapes_adherence", "a red circle", 3)
    next(run)  # the first step is shown, then the visitor leaves: Gradio closes the generator
    run.close()
    assert list(run_dirs.iterdir()) == []


def test_on_the_hub_the_visitor_signs_in_instead_of_pasting_a_token(tmp_path, monkeypatch):
    """Where the app runs as a Space (``SPACE_ID`` set), the page shows the Hub's login button and no token box, and a
    push uses the token of the visitor's login, which Gradio hands to ``push``'s ``gr.OAuthToken`` parameter; signed
    out, the push says to sign in. Locally the token box stays and no login button is shown."""
    import gradio as gr
    import gradio.block_function
    import gradio.routes
    from gradio.helpers import special_args

    app = load_app()
    tokens = []

    class FakeHub:
        def __init__(self, token):
            tokens.append(token)

        def create_repo(self, repo_id, exist_ok):
            pass

        def create_commit(self, repo_id, operations, commit_message):
            pass

    monkeypatch.setattr(app, "HfApi", FakeHub)
    monkeypatch.delenv("SPACE_ID", raising=False)
    local = app.build_demo()
    assert not any(isinstance(block, gr.LoginButton) for block in local.blocks.values())
    assert next(b for b in local.blocks.values() if getattr(b, "elem_id", None) == "token").visible

    # on a Space (what the Hub sets); Gradio's OAuth routes need the Space's OAuth app, so they are left out here
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("SPACE_ID", "me/trl-visual-live")
    monkeypatch.setattr(gradio.routes, "attach_oauth", lambda fastapi_app: None)
    # on a Space Gradio wraps events with the ZeroGPU `spaces` package when importable; here that name is the
    # repository's own spaces/ folder
    monkeypatch.setattr(gradio.block_function, "spaces", None)
    hosted = app.build_demo()
    assert any(isinstance(block, gr.LoginButton) for block in hosted.blocks.values())
    assert not next(b for b in hosted.blocks.values() if getattr(b, "elem_id", None) == "token").visible
    with pytest.raises(gr.Error, match="Sign in with Hugging Face"):
        app.push({"README.md": b"card"}, "me/model", "", None)

    # what Gradio passes to push() for a signed-in visitor: the login's token, put where the parameter's type says
    login = gr.OAuthToken(token="hf_oauth", scope="contribute-repos", expires_at=int(time.time()) + 3600)
    inputs, *_ = special_args(app.push, [{"README.md": b"card"}, "me/model", ""], None, token=login)
    assert inputs[3] is login
    app.push(*inputs)
    assert tokens == ["hf_oauth"]


# -- in the browser --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def space_url(tmp_path):
    """The app on 127.0.0.1 at a free port, in its own process (as a Space runs it), stopped afterwards."""
    pytest.importorskip("gradio")
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
    }
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen(
        [sys.executable, "app.py"], cwd=SPACE, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"the app exited with {process.returncode}:\n{(tmp_path / 'app.log').read_text()}"
                )
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the app did not answer within {START_TIMEOUT} s")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture
def browser():
    """Headless Chromium through Selenium; skipped where either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium/chromedriver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_space_trains_in_the_browser(space_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def find(selector):
        return browser.find_elements(By.CSS_SELECTOR, selector)

    def replace_text(element, text):  # as a user types: Svelte's inputs do not see Selenium's clear()
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        element.send_keys(text)

    browser.get(space_url)
    prompts = wait_for(lambda: find("#prompts textarea"), 60, "the page")[0]

    # bad input: a clear message, and nothing trains
    replace_text(prompts, "")
    find("#train")[0].click()
    wait_for(
        lambda: "No prompts" in browser.find_element(By.TAG_NAME, "body").text, 30, "the empty-prompts error"
    )

    # a short ViPO run on two prompts
    browser.find_element(By.XPATH, "//label[.//span[text()='ViPO']]").click()
    replace_text(prompts, "a red circle on the left\na big blue square at the top")
    replace_text(find("#steps input")[0], "2")
    find("#train")[0].click()
    link = wait_for(lambda: find("#lora a[href$='.safetensors']"), RUN_TIMEOUT, "the end of the run")[0]
    browser.save_screenshot(str(tmp_path / "space.png"))

    status = find("#status")[0].text
    assert "done after 2 steps" in status, status
    assert len(find("#samples img")) == 2  # one sample per prompt
    assert len(find("#maps img")) == 2  # ViPO: each sample beside its map
    points = [p.get_attribute("aria-label") for p in find("#curve [aria-roledescription='point']")]
    assert [label.split(";")[0] for label in points] == ["step: 1", "step: 2"], points
    rewards = [float(label.split("reward:")[1]) for label in points]
    assert all(0.0 <= reward <= 1.0 for reward in rewards), rewards  # shapes_adherence is a probability
    lora = urllib.request.urlopen(link.get_attribute("href"), timeout=10).read()
    from safetensors.torch import load

    keys = list(load(lora))
    assert keys and all("lora" in key for key in keys), keys[:4]
    assert (tmp_path / "space.png").stat().st_size > 10_000
