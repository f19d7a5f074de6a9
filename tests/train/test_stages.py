"""The release's training stages as recipes (scripts/pretrain_video.py, merv/models/vidlms/merv.py freeze_backbones /
load_from_checkpoint, merv/preprocessing/datasets/datasets.py): what each trains, loads and supervises."""

import json

import pytest
import torch

from merv_fast.config import ConfigError, get_preset
from merv_fast.data.prompts import IGNORE_INDEX
from merv_fast.model.merv import build_model
from merv_fast.train.config import RECIPES, STAGES, make_train_config
from merv_fast.train.stages import PROJECTORS, freeze_for_stage, load_initial_weights

from .helpers import make_batch


def test_recipes_follow_the_release_stages():
    table = {name: (make_train_config(name).stage, make_train_config(name).lr,
                    make_train_config(name).global_batch_size, make_train_config(name).weight_decay)
             for name in RECIPES}
    as_tuples = {name: (s.release, s.train_llm, s.data, s.init_loads, lr, batch, wd)
                 for name, (s, lr, batch, wd) in table.items()}
    assert as_tuples == {
        # merv/conf/models.py MERV_Base align_* / finetune_*; MERV_Full's align_learning_rate 1e-4.
        "align": ("align", False, "captions", "all", 1e-3, 256, 0.0),
        "full-align": ("full-align", True, "captions", "all", 1e-3, 256, 0.0),
        "finetune": ("finetune", True, "conversations", "projectors", 2e-5, 128, 0.1),
        "second_finetune": ("second_finetune", True, "conversations", "all", 2e-5, 128, 0.1),
        "merv-frozen": ("finetune", True, "conversations", "all", 2e-5, 128, 0.1),
        "merv-full-stage1": ("full-align", True, "captions", "all", 1e-4, 256, 0.0),
        "merv-full-stage2": ("second_finetune", True, "conversations", "all", 2e-5, 128, 0.1),
    }
    for name in ("finetune", "second_finetune", "merv-full-stage2"):
        with pytest.raises(ConfigError, match=f"recipe '{name}'.*give --init-from"):
            make_train_config(name).check_init()
        make_train_config(name, init_from="run").check_init()


def test_align_trains_projectors_and_fusion_with_the_llm_frozen():
    from merv_fast.train.optim import build_optimizer
    from merv_fast.train.parallel import TrainModule
    from merv_fast.train.schedule import build_scheduler
    from merv_fast.train.step import Stepper

    torch.manual_seed(0)
    model = build_model("tiny", kernels="torch")
    freeze_for_stage(model, STAGES["align"])
    module = TrainModule(model)
    opt = build_optimizer(module, lr=1e-2, weight_decay=0.0)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.visual.parameters() if p.requires_grad} and in_opt
    batches = [make_batch("image", 1, 20, 5, seed=1), make_batch("text", 1, 20, 5, seed=2)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = Stepper(module, opt, build_scheduler(opt, 10, 0.0), device=torch.device("cpu")).step(batches)
    assert result.loss > 0 and torch.isfinite(torch.tensor(result.grad_norm))
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n.startswith("llm."))
    assert not torch.equal(model.visual.projectors[0].weight, before["visual.projectors.0.weight"])
    assert not torch.equal(model.visual.fusion.query, before["visual.fusion.query"])

    # A frozen LLM's backward computes the activations' gradients only: 4 x params x tokens instead of 6.
    from merv_fast.model.flops import llm_params

    unfrozen = build_model("tiny", kernels="torch")
    full = Stepper(TrainModule(unfrozen), build_optimizer(TrainModule(unfrozen), lr=0.0),
                   None, device=torch.device("cpu")).step(batches)
    llm_tokens = sum(int(b.attention_mask.sum()) + (model.num_visual_tokens * len(b) if b.frames is not None else 0)
                     for b in batches)
    assert full.flops - result.flops == 2 * llm_params(model.config.llm)[0] * llm_tokens


def _align_checkpoint(source, path):
    """What the release's align run saves: only its trainable modules (projectors, feature_fusion)."""
    from merv_fast.model.release import nest_release

    nested = nest_release(source.release_state_dict())
    torch.save({"model": {k: nested[k] for k in ("projectors", "feature_fusion")}}, path)


def test_finetune_reloads_only_the_projectors(tmp_path):
    from merv_fast.train.checkpoint import export_safetensors

    torch.manual_seed(1)
    source = build_model("tiny", kernels="torch")  # stands for the align run's result
    export_safetensors(source, tmp_path / "model.safetensors")
    _align_checkpoint(source, tmp_path / "align.pt")
    torch.manual_seed(2)
    fresh = build_model("tiny", kernels="torch").state_dict()
    for path in (tmp_path / "model.safetensors", tmp_path / "align.pt"):
        torch.manual_seed(2)
        model = build_model("tiny", kernels="torch")
        load_initial_weights(model, path, STAGES["finetune"])
        for name, value in model.state_dict().items():
            expected = source.state_dict()[name] if name.startswith(PROJECTORS) else fresh[name]
            assert torch.equal(value, expected), (path.name, name)

    # second_finetune loads every trained weight, and refuses a file without the LLM (the release asserts it).
    torch.manual_seed(2)
    model = build_model("tiny", kernels="torch")
    load_initial_weights(model, tmp_path / "model.safetensors", STAGES["second_finetune"])
    for name, value in model.state_dict().items():
        if not name.startswith("encoders."):
            assert torch.equal(value, source.state_dict()[name]), name
    with pytest.raises(ValueError, match=r"align.pt.*missing.*llm_backbone"):
        load_initial_weights(model, tmp_path / "align.pt", STAGES["second_finetune"])


def test_finetune_refuses_projectors_that_do_not_fit(tmp_path):
    torch.manual_seed(1)
    single = build_model("single-tiny", kernels="torch")
    _align_checkpoint_single = {"model": {"projectors": {"0.projector.projector.weight":
                                                         single.visual.projectors[0].weight.detach()}}}
    torch.save(_align_checkpoint_single, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"partial.pt.*missing \['visual.projectors.0.bias'"):
        load_initial_weights(single, tmp_path / "partial.pt", STAGES["finetune"])
    _align_checkpoint(build_model("tiny", kernels="torch"), tmp_path / "four.pt")
    with pytest.raises(ValueError, match=r"four.pt: key 'projectors.1.projector.projector.weight' has no place"):
        load_initial_weights(single, tmp_path / "four.pt", STAGES["finetune"])


def test_stage1_supervises_captions_only(tmp_path):
    """merv-full stage 1 (full-align) samples are the release's AlignVideoDataset's: `{caption}</s>` with BOS, every
    token but BOS supervised, no human turn and no prompt; stage 2 keeps the conversation."""
    from merv_fast.model.llm import training_tokenizer
    from merv_fast.train.loop import build_dataset

    data = [{"id": "t0", "conversations": [{"from": "human", "value": "Describe it."},
                                           {"from": "gpt", "value": "  A dog runs across the park. "}]}]
    (tmp_path / "data.json").write_text(json.dumps(data))
    model_cfg = get_preset("tiny")
    tokenizer = training_tokenizer(model_cfg.llm)
    stage1 = build_dataset(make_train_config("merv-full-stage1"), model_cfg, tokenizer, str(tmp_path / "data.json"),
                           str(tmp_path))
    sample = stage1[0]
    caption = tokenizer("A dog runs across the park.</s>").input_ids
    assert sample.input_ids == caption and sample.labels == [IGNORE_INDEX] + caption[1:]
    stage2 = build_dataset(make_train_config("merv-full-stage2", init_from="x"), model_cfg, tokenizer,
                           str(tmp_path / "data.json"), str(tmp_path))
    assert stage2[0].input_ids[:len(caption) - 1] != caption[:-1] and IGNORE_INDEX in stage2[0].labels[1:]

    data.append({"id": "t1", "conversations": data[0]["conversations"] * 2})
    (tmp_path / "data.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"entry 1 \(id 't1'\): conversations: .* exactly 2 turns, got 4"):
        build_dataset(make_train_config("align"), model_cfg, tokenizer, str(tmp_path / "data.json"), str(tmp_path))


def test_align_then_finetune_through_merv_fast_train(tmp_path):
    """Two real `merv-fast train` runs: align (LLM frozen) then finetune from the align run's directory, which starts
    from the align run's projectors and from fresh fusion and LLM weights (lr 0 keeps the start visible)."""
    from safetensors.torch import load_file

    from merv_fast.cli import main
    from merv_fast.config import load_config
    from merv_fast.data.synth import synthesize

    data = synthesize(tmp_path / "data", videos=1, images=2, texts=0, seed=0, captions=True)["json"]
    # merv-full: the architecture with an align stage (merv-base's `no-align+` has none)
    common = ["train", "--preset", "merv-full-tiny", "--data", data, "--max-steps", "1", "--set", "num_workers=0",
              "--set", "kernels=torch", "--set", "global_batch_size=2", "--set", "activation_checkpointing=off"]
    assert main(common + ["--recipe", "align", "--set", "warmup_ratio=0", "--out", str(tmp_path / "align")]) == 0
    assert main(common + ["--recipe", "finetune", "--init-from", str(tmp_path / "align"), "--set", "lr=0",
                          "--out", str(tmp_path / "finetune")]) == 0
    torch.manual_seed(0)  # the trainer's seed: both runs start from this model
    fresh = build_model(config=load_config("merv-full-tiny", overrides={"kernels": "torch"})).state_dict()
    aligned = load_file(str(tmp_path / "align" / "model.safetensors"))
    finetuned = load_file(str(tmp_path / "finetune" / "model.safetensors"))
    assert json.loads((tmp_path / "finetune" / "summary.json").read_text())["stage"] == "finetune"
    for name, value in finetuned.items():
        if name.startswith("llm."):
            assert torch.equal(aligned[name], fresh[name]), name  # frozen in align
        if name.startswith(PROJECTORS):
            assert torch.equal(value, aligned[name]), name
        else:
            assert torch.equal(value, fresh[name]), name
    assert not torch.equal(aligned["visual.projectors.0.weight"], fresh["visual.projectors.0.weight"])
    assert not torch.equal(aligned["visual.fusion.query"], fresh["visual.fusion.query"])


def test_finetune_of_a_no_align_architecture_is_refused(tmp_path, capsys):
    """The release's load_from_checkpoint loads nothing for a `no-align+` specifier (merv.py:399-401): a finetune of
    merv-base is recipe merv-frozen, said in one line before anything is built."""
    from merv_fast.cli import main

    assert main(["train", "--recipe", "finetune", "--preset", "tiny", "--init-from", str(tmp_path / "nothing"),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-align" in err and "merv-frozen" in err and "399-401" in err
