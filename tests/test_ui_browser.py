"""End-to-end tests of the web UI in Debian's chromium, driven by Playwright.

The app runs as ``python app.py`` in a subprocess on a free port with a fresh workspace; the base model is a tiny
SD1 pipeline built here and saved as a diffusers folder. The tests run in file order and share the page (the
dataset uploaded by the first one is trained on by the next ones).

Screenshots of the main screens go to ``$RANKWRIGHT_SCREENSHOTS`` (or a temporary folder): ``dataset.png``,
``training.png`` (mid-run) and ``results.png``.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from ui_helpers import free_port

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]
METHODS = ("lora", "loha", "lokr", "oft", "boft")
LABELS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "boft": "BOFT"}
DESCRIPTION_WORDS = {"lora": "Low-rank", "loha": "Hadamard", "lokr": "Kronecker", "oft": "Orthogonal",
                     "boft": "Butterfly"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                     "(apt-get install -y chromium); the browser tests need it"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
expect = sync_api.expect


def png(colour: str, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, "white")
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), colour), (size[0] // 4, size[1] // 4))
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The tiny model, the workspace, and the app serving them."""
    from trainer.architectures import build_tiny_pipeline, write_tiny_tokenizer

    root = tmp_path_factory.mktemp("ui-browser")
    tokenizer = write_tiny_tokenizer(root / "tokenizer")
    pipe = build_tiny_pipeline("sd1", tokenizer)
    pipe.save_pretrained(root / "model")
    uploads = root / "uploads"
    uploads.mkdir()
    for name, colour in (("red.png", "red"), ("green.png", "green"), ("blue.png", "blue")):
        (uploads / name).write_bytes(png(colour))
    (uploads / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    shots = Path(os.environ.get("RANKWRIGHT_SCREENSHOTS") or root / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)

    port = free_port()
    workspace = root / "ws"
    env_vars = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--workspace", str(workspace)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env_vars, text=True)
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(server.stdout), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while not any(url in line for line in output):
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            pytest.fail("the app did not start:\n" + "".join(output))
        time.sleep(0.2)
    print(f"app at {url}, workspace {workspace}")
    yield {"url": url, "root": root, "model": root / "model", "tokenizer": tokenizer, "uploads": uploads,
           "workspace": workspace, "shots": shots, "output": output}
    from ui.jobs import JobRunner

    JobRunner(workspace / "jobs").kill()
    server.terminate()
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture(scope="module")
def page(env):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"])
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        expect.set_options(timeout=30_000)  # two busy cores: the page may take a while to update
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(env["url"])
        # loaded: a first start shows the toy demo's dataset
        expect(page.locator("#dataset-summary")).to_contain_text("12 usable image(s)", timeout=120_000)
        page.errors = errors
        yield page
        browser.close()


@pytest.fixture(scope="module")
def tiny_pipe(env):
    from trainer.architectures import build_tiny_pipeline

    return build_tiny_pipeline("sd1", env["tokenizer"])


# ------------------------------------------------------------------------------------------------ helpers
def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def field(page, elem_id: str):
    return page.locator(f"#{elem_id}").locator("input, textarea").first


def fill(page, elem_id: str, value) -> None:
    box = field(page, elem_id)
    box.fill(str(value))
    box.press("Tab")  # blur: Gradio commits the value


def choose(page, elem_id: str, label: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f"ul[role=listbox] li[role=option][aria-label='{label}']").click()


def text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def wait_finished(page, job: str, timeout_s: float = 240) -> str:
    try:
        expect(page.locator("#job-status")).to_contain_text(
            re.compile(r"(finished|stopped early|failed).*" + re.escape(job)), timeout=timeout_s * 1000)
    except AssertionError:
        raise AssertionError(f"job {job} did not finish: status {text(page, 'job-status')!r}, progress "
                             f"{text(page, 'progress')!r}, log:\n{field(page, 'log').input_value()}\n"
                             f"page errors: {page.errors}") from None
    status = text(page, "job-status")
    assert "failed" not in status, status + "\n" + field(page, "log").input_value()
    return status


def download(page, env, name: str) -> Path:
    """Download ``name`` from the Results tab's file list, through the browser."""
    tab(page, "Results")
    page.locator("#refresh-results").click()
    shown = re.compile(re.escape(name.removesuffix(".safetensors")) + r"\s*\.safetensors")  # stem and suffix
    link = page.locator("#result-files tr", has_text=shown).first.locator("a").first
    expect(link).to_be_visible(timeout=30_000)
    with page.expect_download() as download_info:
        link.click()
    target = env["root"] / "downloads" / name
    target.parent.mkdir(exist_ok=True)
    download_info.value.save_as(target)
    return target


def check_reloads(pipe, path: Path, method: str) -> None:
    from methods.apply import apply_adapter

    handle = apply_adapter(pipe, path, 1.0)
    try:
        assert len(handle.network) > 0 and handle.network.method == method
    finally:
        handle.remove()


def start(page, env) -> str:
    """Click Start; returns the new job's id once the status box shows that job."""
    tab(page, "Training")
    previous = env.get("last_job", "none")
    page.locator("#start").click()
    message = page.locator("#job-message")
    expect(message).to_contain_text(re.compile(rf"Started job (?!{re.escape(previous)})\S+:"))
    job = re.search(r"Started job (\S+):", text(page, "job-message")).group(1)
    env["last_job"] = job
    expect(page.locator("#job-status")).to_contain_text(job)
    return job


# ------------------------------------------------------------------------------------------------ tests
def test_first_start_trains_the_toy_demo_and_compares_methods(page, env):
    """A new user's first minutes: the toy demo is preselected, Start trains it with previews, Compare runs."""
    tab(page, "Training")
    job = start(page, env)
    wait_finished(page, job, 300)
    expect(page.locator("#loss-plot img")).to_be_visible()
    expect(page.locator("#previews img").first).to_be_visible(timeout=60_000)
    assert (env["workspace"] / "outputs" / "toy_zq.safetensors").is_file()
    page.screenshot(path=str(env["shots"] / "demo.png"), full_page=True)

    tab(page, "Compare")
    methods = page.locator("#compare-methods")
    for label in ("loha", "lokr", "boft"):  # keep lora and oft
        box = methods.get_by_label(label, exact=True)
        if box.is_checked():
            box.uncheck()
    fill(page, "compare-steps", 20)
    page.locator("#compare-start").click()
    expect(page.locator("#compare-status")).to_contain_text(re.compile(r"finished|done"), timeout=300_000)
    table = page.locator("#compare-table")
    for name in ("lora", "oft"):
        expect(table).to_contain_text(name)
    expect(page.locator("#compare-grid img")).to_be_visible()
    expect(page.locator("#compare-loss img")).to_be_visible()
    page.screenshot(path=str(env["shots"] / "compare.png"), full_page=True)
    assert not page.errors


def test_dataset_upload_caption_and_corrupt_file(page, env):
    # a first start opens with the toy demo: the embedded model and its dataset (a workspace copy) preselected
    demo = env["workspace"] / "datasets" / "toy_demo"
    expect(field(page, "f-dataset-dir")).to_have_value(str(demo))
    assert len(list(demo.rglob("*.png"))) == 12
    tab(page, "Model & method")
    expect(field(page, "f-model-base")).to_have_value(str(ROOT / "presets" / "toy" / "model"))
    tab(page, "Dataset")
    fill(page, "f-dataset-dir", env["workspace"] / "datasets" / "my_dataset")
    page.locator("#open-folder").click()
    expect(page.locator("#dataset-summary")).to_contain_text("does not exist yet")

    uploads = env["uploads"]
    page.locator("#uploads input[type=file]").set_input_files(
        [str(uploads / n) for n in ("red.png", "green.png", "blue.png", "broken.png")])
    report = page.locator("#upload-report")
    expect(report).to_contain_text("3 image(s) added", timeout=60_000)
    expect(report).to_contain_text("left out broken.png: not an image file")
    gallery = page.locator("#dataset-gallery")
    expect(gallery.locator("img")).to_have_count(3)
    expect(page.locator("#dataset-summary")).to_contain_text("3 usable image(s)")
    folder = env["workspace"] / "datasets" / "my_dataset" / "1_subject"
    assert sorted(p.name for p in folder.iterdir()) == ["blue.png", "green.png", "red.png"]

    # select an image, edit its caption, save
    for _ in range(5):  # a click while the gallery re-renders can get lost
        gallery.locator("img").nth(2).click()
        try:
            expect(page.locator("#selected-label")).to_contain_text("Selected", timeout=10_000)
            break
        except AssertionError:
            continue
    expect(page.locator("#selected-label")).to_contain_text("Selected")
    selected = text(page, "selected-label").split()[-1]
    fill(page, "caption", "a red square on white")
    page.locator("#save-caption").click()
    expect(page.locator("#dataset-status")).to_contain_text("Caption saved")
    assert (folder / selected).with_suffix(".txt").read_text().strip() == "a red square on white"
    expect(gallery).to_contain_text("a red square on white")

    # trigger word for every caption
    fill(page, "trigger", "zq")
    page.locator("#add-trigger").click()
    expect(page.locator("#dataset-status")).to_contain_text("to 3 caption(s)")
    assert (folder / selected).with_suffix(".txt").read_text().strip() == "zq, a red square on white"
    expect(field(page, "caption")).to_have_value("zq, a red square on white")  # the open caption follows
    page.screenshot(path=str(env["shots"] / "dataset.png"), full_page=True)
    assert not page.errors


def test_each_method_trains_and_its_file_reloads(page, env, tiny_pipe):
    workspace = env["workspace"]
    tab(page, "Config")
    settings = f'''
[model]
base = "{env["model"]}"
[dataset]
dir = "{workspace / "datasets" / "my_dataset"}"
resolution = 32
min_bucket_side = 32
max_bucket_side = 64
bucket_step = 8
[network]
method = "lora"
rank = 4
[train]
max_steps = 6
[sample]
every_n_steps = 2
prompts = ["zq a red square"]
steps = 2
[output]
dir = "{workspace / "outputs"}"
name = "lora_adapter"
tensorboard = false
save_state = false
'''
    field(page, "toml").fill(settings)
    page.locator("#apply-toml").click()
    expect(page.locator("#config-status")).to_contain_text("Applied the TOML to the form")
    page.locator("#show-toml").click()
    expect(field(page, "cli")).to_have_value(re.compile(r"^python -m trainer train --config \S+lora_adapter\.toml$"),
                                             timeout=30_000)

    tab(page, "Model & method")
    page.locator("#detect").click()
    expect(page.locator("#detected")).to_contain_text("SD1.x epsilon (diffusers folder)", timeout=120_000)
    expect(page.locator("#estimate")).to_contain_text("measured on the detected SD1.x model", timeout=60_000)
    estimates = {}
    for method in METHODS:  # each method shows its own options, description and estimate
        choose(page, "f-network-method", LABELS[method])
        expect(page.locator(f"#options-{method}").first).to_be_visible()
        for other in METHODS:
            if other != method:
                expect(page.locator(f"#options-{other}").first).to_be_hidden()
        expect(page.locator("#method-description")).to_contain_text(DESCRIPTION_WORDS[method])
        expect(page.locator("#estimate")).not_to_have_text(estimates.get(METHODS[METHODS.index(method) - 1], "x"),
                                                           timeout=60_000)
        estimates[method] = text(page, "estimate")
        assert re.search(r"[\d,]+ trainable parameters · file ≈ [\d.]+ [kM]B", estimates[method])
    assert len(set(estimates.values())) == len(METHODS)

    for method in METHODS:
        tab(page, "Model & method")
        choose(page, "f-network-method", LABELS[method])
        expect(page.locator(f"#options-{method}").first).to_be_visible()
        if method in ("lora", "loha", "lokr"):
            fill(page, f"f-network-{method}-rank", 2)
        tab(page, "Training")
        fill(page, "f-output-name", f"{method}_adapter")
        if method != "lora":  # a short run for each; LoRA's run shows previews and the loss curve mid-run
            fill(page, "f-train-max_steps", 2)
            fill(page, "f-sample-prompts", "")
        job = start(page, env)
        if method == "lora":
            expect(page.locator("#previews img").first).to_be_visible(timeout=240_000)
            expect(page.locator("#loss-plot img")).to_be_visible()
            page.screenshot(path=str(env["shots"] / "training.png"), full_page=True)
        wait_finished(page, job)
        total = 6 if method == "lora" else 2
        expect(page.locator("#progress")).to_contain_text(f"step {total}/{total}")
        assert page.locator("#progress .rw-progress").get_attribute("aria-valuenow") == "100"
        expect(page.locator("#loss-plot img")).to_be_visible()
        if method == "lora":
            expect(page.locator("#previews img")).to_have_count(3)  # steps 2 and 4, and the final one at 6
        path = download(page, env, f"{method}_adapter.safetensors")
        check_reloads(tiny_pipe, path, method)
        if method == "lora":
            tab(page, "Results")
            choose(page, "adapter", "outputs/lora_adapter.safetensors")
            expect(page.locator("#adapter-summary")).to_contain_text("lora_adapter.safetensors")
            expect(page.locator("#adapter-summary")).to_contain_text("method lora · rank 2")
            fill(page, "try-prompt", "zq a red square")
            fill(page, "try-steps", 2)
            fill(page, "try-size", 32)
            page.locator("#try-generate").click()
            expect(page.locator("#try-status")).to_contain_text("Rendered in", timeout=120_000)
            expect(page.locator("#try-with img")).to_be_visible()
            expect(page.locator("#try-without img")).to_be_visible()
            page.screenshot(path=str(env["shots"] / "results.png"), full_page=True)
    assert not page.errors


def test_stop_mid_run_and_second_start_refused(page, env, tiny_pipe):
    tab(page, "Model & method")
    choose(page, "f-network-method", "LoRA")
    tab(page, "Training")
    fill(page, "f-output-name", "stopped")
    fill(page, "f-train-max_steps", 300)
    fill(page, "f-sample-prompts", "")
    job = start(page, env)
    expect(page.locator("#progress")).to_contain_text(re.compile(r"step [1-9]\d*/300"), timeout=240_000)

    page.locator("#start").click()  # a second start while the first job runs
    expect(page.locator("#job-message")).to_contain_text("A training job is already running", timeout=30_000)
    page.locator("#stop").click()
    expect(page.locator("#job-message")).to_contain_text("Stop requested", timeout=30_000)
    status = wait_finished(page, job, 120)
    assert "stopped early" in status
    steps = int(re.search(r"step (\d+)/300", text(page, "progress")).group(1))
    assert 1 <= steps < 300
    name = f"stopped-step{steps:06d}.safetensors"
    path = download(page, env, name)
    check_reloads(tiny_pipe, path, "lora")
    assert (env["workspace"] / "outputs" / name).read_bytes() == path.read_bytes()


def test_reload_reattaches_to_the_last_job(page, env):
    page.reload()
    tab(page, "Training")
    expect(page.locator("#job-status")).to_contain_text("stopped early", timeout=30_000)
    expect(page.locator("#loss-plot img")).to_be_visible()
    assert field(page, "f-output-name").input_value() == "stopped"  # the settings of the last start
    assert not page.errors
