"""The metadata a trained adapter carries tells the truth about the run (format spec §3.1): resolution and bucket
range, start and finish time, kohya's keys where they have a meaning here — and, key by key, why not the others."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from train_helpers import build_model, make_config, run, write_images

WRITTEN = "written"
OFF = "a kohya option this trainer does not have; writing its default would claim a setting nobody chose"

# kohya-ss/sd-scripts train_network.py (commit 48d368fa): the 83 ss_* keys of a plain LoRA run from a single-file
# base (format spec §3.1) → whether our files carry it, or why not.
KOHYA_KEYS = {
    "ss_session_id": WRITTEN, "ss_training_started_at": WRITTEN, "ss_output_name": WRITTEN,
    "ss_learning_rate": WRITTEN, "ss_text_encoder_lr": WRITTEN, "ss_unet_lr": WRITTEN,
    "ss_num_train_images": WRITTEN, "ss_num_validation_images": WRITTEN, "ss_num_reg_images": WRITTEN,
    "ss_num_batches_per_epoch": WRITTEN, "ss_num_epochs": WRITTEN, "ss_gradient_checkpointing": WRITTEN,
    "ss_gradient_accumulation_steps": WRITTEN, "ss_max_train_steps": WRITTEN, "ss_lr_warmup_steps": WRITTEN,
    "ss_lr_scheduler": WRITTEN, "ss_network_module": WRITTEN, "ss_network_dim": WRITTEN, "ss_network_alpha": WRITTEN,
    "ss_network_dropout": "kohya's neuron dropout inside LoRA; our adapters have module_dropout (in ss_network_args)",
    "ss_mixed_precision": WRITTEN,
    "ss_full_fp16": WRITTEN,
    "ss_v2": WRITTEN, "ss_base_model_version": WRITTEN, "ss_clip_skip": WRITTEN,
    "ss_max_token_length": WRITTEN,
    "ss_cache_latents": WRITTEN, "ss_seed": WRITTEN,
    "ss_lowram": "a kohya loading switch with no effect on the weights",
    "ss_noise_offset": WRITTEN,
    "ss_multires_noise_iterations": WRITTEN, "ss_multires_noise_discount": WRITTEN,
    "ss_adaptive_noise_scale": WRITTEN, "ss_zero_terminal_snr": WRITTEN,
    "ss_training_comment": WRITTEN,
    "ss_sd_scripts_commit_hash": "names a kohya sd-scripts commit; modelspec.implementation_version names ours",
    "ss_optimizer": WRITTEN, "ss_max_grad_norm": WRITTEN, "ss_caption_dropout_rate": WRITTEN,
    "ss_caption_dropout_every_n_epochs": WRITTEN, "ss_caption_tag_dropout_rate": WRITTEN,
    "ss_face_crop_aug_range": OFF,
    "ss_prior_loss_weight": WRITTEN, "ss_min_snr_gamma": WRITTEN,
    "ss_scale_weight_norms": WRITTEN, "ss_ip_noise_gamma": WRITTEN, "ss_debiased_estimation": WRITTEN,
    "ss_noise_offset_random_strength": WRITTEN, "ss_ip_noise_gamma_random_strength": WRITTEN,
    "ss_loss_type": WRITTEN,
    "ss_huber_schedule": WRITTEN, "ss_huber_scale": WRITTEN, "ss_huber_c": WRITTEN,
    "ss_fp8_base": WRITTEN, "ss_fp8_base_unet": WRITTEN,
    "ss_validation_seed": "validation noise is keyed by train.seed (ss_seed) and the image",
    "ss_validation_split": WRITTEN,
    "ss_max_validation_steps": "validation always covers every held-out image",
    "ss_validate_every_n_epochs": "validation runs by steps only (ss_validate_every_n_steps)",
    "ss_validate_every_n_steps": WRITTEN,
    "ss_resize_interpolation": "always Lanczos (masks bilinear); kohya's key names its own choice of resampler",
    "ss_batch_size_per_device": WRITTEN, "ss_total_batch_size": WRITTEN, "ss_resolution": WRITTEN,
    "ss_color_aug": WRITTEN, "ss_flip_aug": WRITTEN, "ss_random_crop": WRITTEN, "ss_shuffle_caption": WRITTEN,
    "ss_enable_bucket": WRITTEN,
    "ss_bucket_no_upscale": WRITTEN,
    "ss_min_bucket_reso": WRITTEN, "ss_max_bucket_reso": WRITTEN, "ss_keep_tokens": WRITTEN,
    "ss_dataset_dirs": WRITTEN, "ss_reg_dataset_dirs": WRITTEN, "ss_tag_frequency": WRITTEN, "ss_bucket_info": WRITTEN,
    "ss_sd_model_hash": "written for a single-file base (test below); a folder or hub id has no one file to hash",
    "ss_new_sd_model_hash": "written for a single-file base (test below); a folder or hub id has no one file to hash",
    "ss_sd_model_name": WRITTEN,
    "ss_training_finished_at": WRITTEN, "ss_steps": WRITTEN, "ss_epoch": WRITTEN,
}
# ss_* keys we write that a plain kohya LoRA run does not.
OURS_ONLY = {
    "ss_network_args": "kohya writes it whenever network_args are given; LyCORIS readers need algo (and DoRA) here",
    "ss_v_parameterization": "tells v-prediction SD2 apart for loaders that read it (A1111, our apply_adapter)",
    "ss_ema_decay": "the adapter weights are an EMA (train.ema_decay); kohya has no EMA",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("metadata")
    model = build_model(root, "sd1", tokenizer_dir)
    write_images(root / "data" / "1_zq", 2)
    write_images(root / "data" / "1_zq", 2, size=(32, 16), start=2)  # a wide bucket too
    return root, model


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_our_keys_next_to_kohyas_83(trained):
    root, model = trained
    assert len(KOHYA_KEYS) == 83
    result, _ = run(make_config(model["folder"], root / "data", root / "out-keys", train={"ema_decay": 0.5}))
    ours = {key for key in metadata_of(result.output_file) if key.startswith("ss_")}
    for key, why in KOHYA_KEYS.items():
        if why == WRITTEN:
            assert key in ours, f"{key} is marked written but missing"
        else:
            assert key not in ours and len(why) > 20, f"{key}: {why}"
    assert ours - set(KOHYA_KEYS) == set(OURS_ONLY)


def test_resolution_buckets_and_times_are_the_runs(trained):
    root, model = trained
    before = time.time()
    result, _ = run(make_config(model["folder"], root / "data", root / "out-truth",
                                train={"max_steps": 6, "unet_lr": 2e-3, "min_snr_gamma": 5.0, "max_grad_norm": 0.5},
                                dataset={"reg_weight": 0.7}, output={"comment": "first try"}))
    metadata = metadata_of(result.output_file)
    assert metadata["ss_resolution"] == "(16, 16)" and metadata["modelspec.resolution"] == "16x16"
    # the buckets the samples got: 16×16 and 24×8 (wide images); not the configured 8…64 limits
    assert (metadata["ss_min_bucket_reso"], metadata["ss_max_bucket_reso"]) == ("8", "24")
    started, finished = float(metadata["ss_training_started_at"]), float(metadata["ss_training_finished_at"])
    assert before <= started < finished <= time.time()
    assert metadata["ss_unet_lr"] == "0.002" and metadata["ss_text_encoder_lr"] == "0.001"
    assert metadata["ss_min_snr_gamma"] == "5.0" and metadata["ss_max_grad_norm"] == "0.5"
    assert metadata["ss_prior_loss_weight"] == "0.7" and metadata["ss_training_comment"] == "first try"
    assert metadata["ss_num_epochs"] == "2" and metadata["ss_steps"] == "6"  # 4 batches per epoch
    assert int(metadata["ss_session_id"]) >= 0

    plain, _ = run(make_config(model["folder"], root / "data", root / "out-plain",
                               dataset={"enable_buckets": False}, train={"train_text_encoder": False}))
    metadata = metadata_of(plain.output_file)
    assert (metadata["ss_min_bucket_reso"], metadata["ss_max_bucket_reso"]) == ("None", "None")  # as kohya
    assert metadata["ss_enable_bucket"] == "False" and metadata["ss_text_encoder_lr"] == "None"
    assert metadata["ss_min_snr_gamma"] == "None" and metadata["ss_training_comment"] == "None"
    assert "ss_sd_model_hash" not in metadata  # a folder base: no file to hash


def test_a_single_file_base_is_identified_by_kohyas_hashes(trained):
    root, model = trained
    result, _ = run(make_config(model["single"], root / "data", root / "out-single", tokenizer=model["tokenizer"],
                                train={"max_steps": 1}))
    metadata = metadata_of(result.output_file)
    data = model["single"].read_bytes()
    assert metadata["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()
    assert metadata["ss_sd_model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert metadata["ss_sd_model_name"] == model["single"].name


def test_a_resumed_run_keeps_its_start(trained):
    root, model = trained
    first, _ = run(make_config(model["folder"], root / "data", root / "out-start", train={"max_steps": 1}))
    started = metadata_of(first.output_file)["ss_training_started_at"]
    resumed, _ = run(make_config(model["folder"], root / "data", root / "out-start-2", train={"max_steps": 2}),
                     resume=first.state_dir)
    metadata = metadata_of(resumed.output_file)
    assert metadata["ss_training_started_at"] == started
    assert float(metadata["ss_training_finished_at"]) > float(started)
