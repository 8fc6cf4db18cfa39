"""Probe (not a feature): would training the trigger word's own token vectors (pivotal tuning) tie a held-out toy
concept to its trigger?

Trains the toy preset on a concept folder (``python -m trainer.toy concept``) with the vectors of the trigger's
tokens in the toy CLIP's embedding table trained next to the adapter (their own optimizer group, ``--embedding-lr``,
no weight decay, the gradient of every other row masked out), optionally with output preservation, then renders
and scores exactly as ``trainer compare`` does (the same plan, prompts and seeds; the trained vectors written into
the base pipeline's table before the adapter is applied). The vectors are not saved: the adapter file alone does
not reproduce the row. README, "Further LoRA runs", lists what it measured.

    OMP_NUM_THREADS=1 python bench/pivotal_probe.py --data data/orange --embedding-lr 5e-2 --preservation 0.3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.apply import apply_adapter  # noqa: E402
from trainer import loop, toy  # noqa: E402
from trainer.compare import (  # noqa: E402
    DRIFT_SEED_OFFSET,
    load_base_pipeline,
    method_config,
    parse_method_override,
    prior_drift,
    render_plan,
    render_row,
)
from trainer.config import TrainerConfig  # noqa: E402
from trainer.sampling import render_previews  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train_with_trigger_vectors(config: TrainerConfig, trigger: str, embedding_lr: float):
    """Run the trainer with the trigger's rows of the token-embedding table in the optimizer; (result, rows, ids)."""
    found: dict[str, object] = {}
    plain_groups = loop.parameter_groups

    def groups(network, train, block_weights=None):
        chosen = plain_groups(network, train, block_weights)
        if embedding_lr > 0:
            pipe = found["trainer"].models.pipe
            table = pipe.text_encoder.get_input_embeddings().weight
            ids = pipe.tokenizer(trigger, add_special_tokens=False).input_ids
            mask = torch.zeros(table.shape[0], 1)
            mask[ids] = 1.0
            table.requires_grad_(True)
            table.register_hook(lambda grad: grad * mask)
            found["ids"], found["table"] = ids, table
            chosen.append({"params": [table], "lr": embedding_lr, "weight_decay": 0.0, "name": "trigger vectors"})
        return chosen

    loop.parameter_groups = groups
    try:
        found["trainer"] = trainer = loop.Trainer(config)
        result = trainer.run()
    finally:
        loop.parameter_groups = plain_groups
    rows = found["table"].detach()[found["ids"]].clone() if "ids" in found else None
    return result, rows, found.get("ids")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a concept folder of trainer.toy concept (NN_<trigger>/)")
    parser.add_argument("--embedding-lr", type=float, default=5e-2)
    parser.add_argument("--preservation", type=float, default=0.0, help="train.output_preservation_weight")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--out", default="output/pivotal-probe")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="as compare's --override for this method, e.g. train.learning_rate=3e-3")
    args = parser.parse_args()

    config = TrainerConfig.load(ROOT / "presets" / "toy_demo.toml")
    config.model.base = str(ROOT / config.model.base)
    config.dataset.dir = args.data
    config.output.tensorboard, config.output.save_state = False, False
    config.train.output_preservation_weight = args.preservation
    overrides = dict(parse_method_override(f"{args.method}:{item}")[1:] for item in args.set)
    config = method_config(config, args.method, args.out, overrides).config  # as compare trains it
    concept = toy.concept_for_dataset(args.data)
    if concept is None:
        raise SystemExit(f"{args.data}: no folder named after a toy concept's trigger (python -m trainer.toy concept)")

    started = time.time()
    result, rows, ids = train_with_trigger_vectors(config, concept.trigger, args.embedding_lr)
    seconds = time.time() - started
    plan = render_plan(config)
    pipe = load_base_pipeline(config)
    base = render_row(pipe, plan)
    other_seed = render_previews(pipe, plan.drift_prompts,
                                 **{**plan.options, "seed": plan.options["seed"] + DRIFT_SEED_OFFSET})
    if rows is not None:
        with torch.no_grad():
            pipe.text_encoder.get_input_embeddings().weight[ids] = rows
    with apply_adapter(pipe, result.output_file, plan.strength):
        adapted = render_row(pipe, plan)
    base_rate = toy.prompt_match(base.drift, plan.drift_prompts)["all"]
    figures = {"concept": concept.score(adapted.concept),
               "trigger_subject": toy.prompt_match(adapted.concept, plan.concept_prompts)["shape"],
               "prompts_kept": toy.prompt_match(adapted.drift, plan.drift_prompts)["all"] / base_rate,
               "drift": prior_drift(base.drift, adapted.drift, other_seed), "train_seconds": seconds}
    if rows is not None:
        figures["vector_norms"] = [round(float(n), 3) for n in rows.norm(dim=1)]
    print(json.dumps({key: round(value, 3) if isinstance(value, float) else value for key, value in figures.items()}))


if __name__ == "__main__":
    main()
