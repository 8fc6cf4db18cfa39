"""Pivotal tuning (methods.embeddings, train.embedding_lr): the trigger word's token vectors replace exactly its
token n-gram, read back by diffusers' own textual-inversion loader as the same conditioning; they train next to
the adapter (the frozen tables untouched), are saved beside each adapter file, follow it through step names,
pruning and resume, are switched off with the adapters for the base model's passes, and come along when the
adapter is applied; every way a user can get them wrong is refused with the fix named."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import build_model, make_config, of_kind, write_images, write_trigger_data

from methods.apply import apply_adapter
from methods.base import ConfigError
from methods.embeddings import (
    METADATA_FILE,
    METADATA_WORD,
    TriggerEmbeddings,
    embedding_path,
    replace_word,
    save_embedding_file,
)
from methods.files import AdapterFileError, load_adapter_file
from methods.tools import bake_adapters, convert_to_lora
from trainer import events as ev
from trainer.loop import Trainer

FAST_SAMPLE = {"steps": 2, "guidance_scale": 1.0}


def test_only_the_words_token_ngram_is_replaced_and_only_the_vectors_get_gradients():
    embedded = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3).requires_grad_(True)
    ids = torch.tensor([[5, 7, 8, 1, 7, 9], [7, 8, 7, 8, 2, 8]])
    vectors = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]], requires_grad=True)
    out = replace_word(ids, embedded, torch.tensor([7, 8]), vectors)
    replaced = (out == -1).all(-1) | (out == -2).all(-1)
    assert replaced.tolist() == [[False, True, True, False, False, False], [True, True, True, True, False, False]]
    assert torch.equal(out[~replaced], embedded[~replaced])  # a lone 7 or 8 is another word: left alone
    out.sum().backward()
    assert vectors.grad.tolist() == [[3.0] * 3, [3.0] * 3]  # three occurrences
    assert embedded.grad[replaced].abs().sum() == 0
    assert replace_word(ids[:, :1], embedded[:, :1], torch.tensor([7, 8]), vectors).shape == (2, 1, 3)


def _encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):
            return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0]
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


@pytest.mark.parametrize("arch, keys", [("sd1", {"emb_params"}), ("sdxl", {"clip_l", "clip_g"})])
def test_the_file_is_the_textual_inversion_diffusers_reads_as_the_same_conditioning(arch, keys, tiny_pipeline,
                                                                                      tmp_path):
    pipe = tiny_pipeline(arch)
    embeddings = TriggerEmbeddings.for_word(pipe, arch, "zq")
    count = len(embeddings.entries[0].token_ids)
    assert count >= 1
    torch.manual_seed(0)
    with torch.no_grad():
        for entry in embeddings:
            entry.vectors.normal_()
    path = save_embedding_file(embeddings, tmp_path / "run_emb.safetensors", title="run", dtype="fp32")
    tensors = load_file(str(path))
    assert set(tensors) == set(keys) and all(value.shape[0] == count for value in tensors.values())
    _, metadata = load_adapter_file(path)
    assert metadata["modelspec.architecture"].endswith("/textual-inversion") and metadata[METADATA_WORD] == "zq"

    base = _encode(pipe, "a zq circle")
    embeddings.attach()
    ours = _encode(pipe, "a zq circle")
    plain = _encode(pipe, "a red circle")
    embeddings.enabled = False
    assert torch.equal(_encode(pipe, "a zq circle"), base)
    embeddings.enabled = True
    embeddings.detach()
    assert torch.equal(_encode(pipe, "a zq circle"), base) and not torch.allclose(ours, base)

    oracle = tiny_pipeline(arch)  # diffusers' own loader, the token spelled differently: the same positions
    if arch == "sd1":
        oracle.load_textual_inversion(str(path), token="<rw>")
    else:
        oracle.tokenizer_2 = copy.deepcopy(oracle.tokenizer_2)  # the tiny pipeline's two are one object
        oracle.load_textual_inversion(tensors["clip_l"], token="<rw>", text_encoder=oracle.text_encoder,
                                      tokenizer=oracle.tokenizer)
        oracle.load_textual_inversion(tensors["clip_g"], token="<rw>", text_encoder=oracle.text_encoder_2,
                                      tokenizer=oracle.tokenizer_2)
    torch.testing.assert_close(_encode(oracle, "a <rw> circle"), ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_encode(oracle, "a red circle"), plain)


def test_vectors_for_another_model_or_base_are_refused(tiny_pipeline, tmp_path):
    pipe = tiny_pipeline("sd1")
    count = len(TriggerEmbeddings.for_word(pipe, "sd1", "zq").entries[0].token_ids)
    with pytest.raises(AdapterFileError, match="clip_l"):
        TriggerEmbeddings.from_tensors(tiny_pipeline("sdxl"), "sdxl", "zq", {"emb_params": torch.zeros(count, 32)})
    with pytest.raises(AdapterFileError, match="another base model"):
        TriggerEmbeddings.from_tensors(pipe, "sd1", "zq", {"emb_params": torch.zeros(count, 16)})
    with pytest.raises(ConfigError, match="SD1, SD2 and SDXL"):
        TriggerEmbeddings.for_word(pipe, "flux", "zq")
    with pytest.raises(ConfigError, match="no tokens"):
        TriggerEmbeddings.for_word(pipe, "sd1", " ")


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tokenizer_dir):
    return build_model(tmp_path_factory.mktemp("embeddings-sd1"), "sd1", tokenizer_dir)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_trigger_data(tmp_path / "data", "2_zq")


def test_a_run_trains_the_vectors_saves_them_beside_each_adapter_and_applies_them(sd1, data, tmp_path, tiny_pipeline):
    events: list[dict] = []
    out = tmp_path / "out"
    config = make_config(sd1["folder"], data, out, sample=FAST_SAMPLE,
                         train={"max_steps": 6, "embedding_lr": 0.05, "output_preservation_weight": 0.5},
                         dataset={"cache_text_encoder_outputs": True},
                         output={"save_every_n_steps": 2, "save_last_n_steps": 1, "save_state": True})
    trainer = Trainer(config, on_event=events.append)
    result = trainer.run()
    network, models = trainer.state.network, trainer.models
    ready = of_kind(events, "ready")[0]
    assert {"name": "embeddings", "lr": 0.05, "tensors": 1} in ready["parameter_groups"]
    assert ready["train_text_encoder"] and not ready["text_embeddings_cached"] and ready["trigger_vectors"] == "zq"
    assert "the token vectors of 'zq' trained too" in ev.Ready(trigger_vectors="zq").text()

    # the frozen table is untouched; the vectors moved
    fresh = TriggerEmbeddings.for_word(models.pipe, "sd1", "zq")
    trained = network.embeddings.entries[0].vectors.detach()
    assert not torch.allclose(trained, fresh.entries[0].vectors)
    assert not models.pipe.text_encoder.get_input_embeddings().weight.requires_grad

    # beside every kept save, named in its metadata; the pruned step save took its file along
    final = Path(result.output_file)
    adapters = {p for p in out.glob("*.safetensors") if not p.name.endswith("_emb.safetensors")}
    assert {p.name for p in out.glob("*_emb.safetensors")} == {embedding_path(p).name for p in adapters}
    assert final in adapters and not (out / "adapter-step000002.safetensors").exists()  # pruned, its vectors too
    _, metadata = load_adapter_file(final)
    assert metadata[METADATA_WORD] == "zq" and metadata[METADATA_FILE] == "adapter_emb.safetensors"
    saved = load_file(str(embedding_path(final)))["emb_params"]
    torch.testing.assert_close(saved, trained.cpu())
    assert not any(key.startswith("emb") or "vectors" in key for key in load_file(str(final)))

    # applied with the adapter on a fresh pipeline: trigger prompts read the vectors, others do not
    pipe = tiny_pipeline("sd1")
    base_trigger = _encode(pipe, "a photo of zq")
    with apply_adapter(pipe, final, 1.0) as applied:
        assert applied.network.embeddings is not None
        with applied.network.switched_off():
            assert torch.equal(_encode(pipe, "a photo of zq"), base_trigger)
        with_vectors, plain = _encode(pipe, "a photo of zq"), _encode(pipe, "a photo of a ball")
        applied.network.embeddings.enabled = False  # the text-encoder LoRA alone
        assert torch.equal(_encode(pipe, "a photo of a ball"), plain)  # the vectors touch the trigger's prompts only
        assert not torch.allclose(_encode(pipe, "a photo of zq"), with_vectors)
        applied.network.embeddings.enabled = True
    assert torch.equal(_encode(pipe, "a photo of zq"), base_trigger)

    # merged into a model: the vectors go into the token table; converted to LoRA: the file is copied along
    with apply_adapter(pipe, final, 1.0):
        applied_text = _encode(pipe, "a photo of zq")
    merged = tiny_pipeline("sd1")
    report = bake_adapters(merged, [(final, 1.0)], "sd1")[0]
    assert report.trigger_vectors == "zq"
    torch.testing.assert_close(_encode(merged, "a photo of zq"), applied_text, rtol=1e-4, atol=1e-4)
    converted = convert_to_lora(final, tmp_path / "small.safetensors", rank=2, pipe=tiny_pipeline("sd1"))
    assert converted.modules and load_adapter_file(tmp_path / "small.safetensors")[1][METADATA_FILE] == \
        "small_emb.safetensors"
    assert torch.equal(load_file(str(tmp_path / "small_emb.safetensors"))["emb_params"], saved)

    # without its embedding file the adapter is refused, naming the file
    embedding_path(final).rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(AdapterFileError, match="adapter_emb.safetensors"):
        apply_adapter(pipe, final, 1.0)
    (tmp_path / "elsewhere.safetensors").rename(embedding_path(final))

    # resuming the finished run to more steps keeps its files under the step name, the vectors with them
    more = make_config(sd1["folder"], data, out, sample=FAST_SAMPLE,
                       train={"max_steps": 8, "embedding_lr": 0.05, "output_preservation_weight": 0.5},
                       dataset={"cache_text_encoder_outputs": True},
                       output={"save_every_n_steps": 2, "save_last_n_steps": 1, "save_state": True})
    Trainer(more, resume=final.with_name("adapter-state")).run()
    kept = next(p for p in out.glob("adapter-step000006*.safetensors") if not p.name.endswith("_emb.safetensors")
                and p not in adapters)  # the finished file under its step name
    assert load_adapter_file(kept)[1][METADATA_FILE] == "adapter_emb.safetensors"  # written under the final name
    torch.testing.assert_close(load_file(str(embedding_path(kept)))["emb_params"], saved)
    with apply_adapter(pipe, kept, 1.0) as applied:  # found beside it under its new name
        assert applied.network.embeddings is not None
    assert not torch.equal(load_file(str(embedding_path(final)))["emb_params"], saved)  # trained on from the state


def test_a_run_needs_exactly_one_trigger_word(sd1, tmp_path):
    data = tmp_path / "data"
    write_images(data / "2_zq", 2, caption="zq, a ball")
    write_images(data / "2_kb", 2, caption="kb, a ball", seed=1)
    config = make_config(sd1["folder"], data, tmp_path / "out", sample=FAST_SAMPLE, train={"embedding_lr": 0.05})
    with pytest.raises(ConfigError, match="found kb, zq.*train.embedding_word"):
        Trainer(config).run()
    chosen = make_config(sd1["folder"], data, tmp_path / "out2", sample=FAST_SAMPLE,
                         train={"embedding_lr": 0.05, "embedding_word": "kb", "max_steps": 1})
    Trainer(chosen).run()
    assert load_adapter_file(tmp_path / "out2" / "adapter.safetensors")[1][METADATA_WORD] == "kb"
    with pytest.raises(ConfigError, match="embedding_lr must be ≥ 0"):
        make_config(sd1["folder"], data, tmp_path / "out3", train={"embedding_lr": -1.0})


def test_an_embedding_file_of_an_earlier_run_is_not_overwritten(sd1, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_emb.safetensors").write_bytes(b"a user's file")
    config = make_config(sd1["folder"], data, out, sample=FAST_SAMPLE, train={"embedding_lr": 0.05, "max_steps": 1})
    with pytest.raises(ConfigError, match="adapter_emb.safetensors already exists"):
        Trainer(config).run()
    assert (out / "adapter_emb.safetensors").read_bytes() == b"a user's file"


def test_the_download_lists_each_adapter_with_its_embedding_file_inside_the_workspace_only(ws, tmp_path):
    from ui.app import RankwrightUI

    ui = RankwrightUI(ws, preset_dirs=[])
    ws.outputs.mkdir(parents=True, exist_ok=True)
    plain, pivotal, linked = (ws.outputs / f"{name}.safetensors" for name in ("plain", "pivotal", "linked"))
    for path in (plain, pivotal, embedding_path(pivotal), linked):
        path.write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"not the workspace's")
    embedding_path(linked).symlink_to(tmp_path / "secret.safetensors")  # a link out of the workspace
    assert ui.downloads([str(plain), str(pivotal)]) == [str(plain), str(pivotal), str(embedding_path(pivotal))]
    assert ui.downloads([str(linked)]) == [str(linked)]
