"""Stage 2 started from pretrained towers (--init-vision SOURCE:PATH) and the LLM2CLIP recipes (--recipe).

For each source a tiny random tower is built and saved by its owning library (transformers, open_clip,
timm; EVA-CLIP's naming converted from timm, see tests/tower_fixtures.py); the tower the trainer builds
from the flags is compared with the library's outputs (fp32 tolerance rule of tests/tower_fixtures.py),
then a 2-step run trains from it and its final/ records where the tower came from.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from llm2clip.apps.train import main, parse_config
from llm2clip.cli import UsageError
from llm2clip.models.clip_model import ClipModel
from llm2clip.training.model import build_model
from llm2clip.training.recipes import RECIPES, check_cache, describe, resolve_batch
from tests.tower_fixtures import (
    compare,
    eva_clip_state_dict,
    images,
    openclip_all,
    openclip_folder,
    ours_all,
    perturbed,
    timm_all,
    timm_folder,
)
from tests.train_fixtures import make_data, spec

SIZE, PATCH, WIDTH, HEADS = 16, 8, 32, 2  # a 2 x 2 grid, head_dim 16 (RoPE needs a multiple of 4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    _, cache = make_data(root / "data")
    return {"shards": str(root / "data" / "train-{0000..0003}.tar"), "cache": str(cache)}


def args(data, out, *extra) -> list[str]:
    return [
        "--train-shards", data["shards"], "--cache", data["cache"], "--embed-dim", "16",
        "--adapter-depth", "1", "--batch-size", "8", "--steps", "2", "--workers", "0",
        "--output-dir", str(out), "--device", "cpu", "--lr", "1e-3", "--warmup-steps", "1",
        "--loss-backend", "torch", "--no-tensorboard", *extra,
    ]  # fmt: skip


def _hf(root):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=HEADS,
        patch_size=PATCH, image_size=SIZE, projection_dim=24,
    )  # fmt: skip
    model = perturbed(transformers.CLIPVisionModelWithProjection(cfg))
    model.save_pretrained(root)

    def run(m, x):
        out = m(pixel_values=x, output_hidden_states=True)
        return [out.image_embeds, *out.hidden_states]

    return model, f"hf:{root}", run, []


def _open_clip(root):
    vision = dict(image_size=SIZE, layers=2, width=WIDTH, head_width=16, mlp_ratio=1.5, patch_size=PATCH)
    model, folder = openclip_folder(root, vision, quick_gelu=True, embed_dim=24)
    return model, f"open_clip:{folder}", openclip_all, []


def _timm(root):
    kw = dict(embed_dim=WIDTH, num_heads=HEADS, img_size=SIZE, num_classes=24)
    model, folder = timm_folder(root, "eva02_large_patch14_clip_224", **kw)
    return model, f"timm:{folder}", timm_all, []


def _eva_clip(root):
    kw = dict(embed_dim=WIDTH, num_heads=HEADS, img_size=SIZE, num_classes=24)
    model, _ = timm_folder(root, "eva02_large_patch14_clip_224", **kw)
    ckpt = root / "EVA02_CLIP_tiny.pt"
    torch.save(eva_clip_state_dict(model.state_dict(), head_dim=16, pt=16, grid=SIZE // PATCH, depth=2), ckpt)
    return model, f"eva_clip:{ckpt}", timm_all, []


SOURCES = {"hf": _hf, "open_clip": _open_clip, "timm": _timm, "eva_clip": _eva_clip}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_init_vision_tower_equals_the_library_and_trains(data, tmp_path, source):
    ref, spec_text, ref_fn, extra = SOURCES[source](tmp_path / "tower")
    flags = [
        "--init-vision",
        spec_text,
        "--init-vision-proj",
        "keep",
        "--vision-overrides",
        '{"attn_backend": "sdpa"}',
    ]
    cfg = parse_config(args(data, tmp_path / "run", *flags, *extra))
    model = build_model(cfg.model, cfg.loss.kind, spec())  # what the trainer builds from these flags
    assert model.visual.config.init_source == spec_text
    rope = source in ("timm", "eva_clip")
    compare(ours_all, ref_fn, model.visual.eval(), ref, images(SIZE), fp32_parts=rope)  # every block
    metrics = main(args(data, tmp_path / "run", *flags, *extra))
    assert metrics["finished"] and all(torch.isfinite(torch.tensor(metrics["losses"])))
    final = ClipModel.load(tmp_path / "run" / "final")  # the tower is rebuilt from its recorded config
    assert final.config.vision["config"]["init_source"] == spec_text
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["init_vision"] == spec_text


def test_projection_replace_or_keep(data, tmp_path):
    _, spec_text, _, _ = _hf(tmp_path / "tower")
    replaced = build_model(
        parse_config(args(data, tmp_path, "--init-vision", spec_text)).model, "infonce", spec()
    )
    assert replaced.visual.proj is None and replaced.visual_proj.in_features == WIDTH  # LLM2CLIP: a new head
    kept = parse_config(args(data, tmp_path, "--init-vision", spec_text, "--init-vision-proj", "keep"))
    kept = build_model(kept.model, "infonce", spec())
    assert kept.visual.proj.out_features == 24 and kept.visual_proj.in_features == 24


def test_init_vision_bad_input_is_named(data, tmp_path):
    cases = [
        (
            ["--init-vision", "clip:/x"],
            "expected SOURCE:PATH with SOURCE one of hf, open_clip, timm, eva_clip",
        ),
        (["--init-vision", "hf:/x", "--init-from", "/y"], "--init-vision and --init-from are exclusive"),
        (["--init-vision-config", "ViT-B-16"], "--init-vision-config applies to --init-vision"),
        (["--init-vision", "hf:/x", "--vision", "mobilenet_v2"], "--init-vision loads ViT towers"),
        (["--vision", "B/16", "--pretrained"], r"apply to mobilenet_v2 \(ViTs: --init-vision SOURCE:PATH\)"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_config(args(data, tmp_path, *extra))
    with pytest.raises(FileNotFoundError, match="--init-vision hf:/nonexistent: /nonexistent does not exist"):
        main(args(data, tmp_path / "missing", "--init-vision", "hf:/nonexistent"))


def test_recipe_variant_checks_the_loaded_tower(data, tmp_path):
    _, spec_text, _, _ = _timm(tmp_path / "tower")
    cfg = parse_config(args(data, tmp_path, "--recipe", "llm2clip-eva02-l14-336", "--init-vision", spec_text))
    with pytest.raises(
        ValueError, match=r"is not a --vision EVA02-L/14-336 tower: image_size 16 vs 336, .*width 32"
    ):
        build_model(cfg.model, cfg.loss.kind, spec())


# --- recipes ------------------------------------------------------------------------------------------


def _recipe_args(data, out, *extra):
    """The recipe sets most flags: give only the data, the sizes a CPU test needs, and the run length."""
    tiny = '{"width": 32, "depth": 2, "heads": 2, "patch_size": 8, "image_size": 16}'
    return [
        "--train-shards", data["shards"], "--cache", data["cache"], "--output-dir", str(out),
        "--workers", "0", "--device", "cpu", "--loss-backend", "torch", "--vision", "B/16",
        "--no-tensorboard", "--vision-overrides", tiny, *extra,
    ]  # fmt: skip


def test_recipe_sets_values_records_sources_and_yields_to_flags(data, tmp_path):
    cfg = parse_config(_recipe_args(data, tmp_path, "--recipe", "llm2clip", "--epochs", "10"))
    o = cfg.optim
    assert (o.lr, o.adapter_lr, o.weight_decay, o.layer_decay, o.grad_clip, o.decay, o.warmup_steps) == (
        1e-5, 1e-5, 0.05, 0.85, 5.0, "cosine", 0,
    )  # fmt: skip
    assert (o.beta1, o.beta2, o.eps, o.epochs) == (0.9, 0.999, 1e-8, 10)
    assert (cfg.model.embed_dim, cfg.model.adapter_depth, cfg.loss.kind) == (1280, 4, "infonce")
    prov = cfg.recipe.provenance
    assert set(prov) == set(RECIPES["llm2clip"])
    assert prov["optim.epochs"] == {"value": 10, "source": "command line (recipe llm2clip: 4)"}
    assert prov["optim.lr"]["source"].startswith("recipe llm2clip: paper")
    assert cfg.recipe.global_batch_size == 4096 and cfg.recipe.expect_pooling == "mean"
    shown = describe(cfg)
    assert "  --loss 'infonce'  <- recipe llm2clip:" in shown and "  --epochs 10  <- command line" in shown
    # The global batch becomes the per-rank batch once the world size is known.
    assert resolve_batch(cfg, 8).data.batch_size == 512
    with pytest.raises(ValueError, match="--global-batch-size 4096 does not divide over 3 ranks"):
        resolve_batch(cfg, 3)
    # An explicit --batch-size wins over the recipe's global batch; both explicit are refused.
    per_rank = parse_config(_recipe_args(data, tmp_path, "--recipe", "llm2clip", "--batch-size", "8"))
    assert per_rank.recipe.global_batch_size == 0 and resolve_batch(per_rank, 4).data.batch_size == 8
    with pytest.raises(UsageError, match="give one of --batch-size"):
        parse_config(_recipe_args(data, tmp_path, "--batch-size", "8", "--global-batch-size", "16"))
    with pytest.raises(SystemExit):
        parse_config(_recipe_args(data, tmp_path, "--recipe", "llm2clip-h14"))


def test_recipe_run_writes_its_sources_into_config_json(data, tmp_path):
    out = tmp_path / "run"
    extra = ["--recipe", "llm2clip", "--global-batch-size", "16", "--steps", "2", "--embed-dim", "16",
             "--adapter-depth", "1"]  # fmt: skip
    metrics = main(_recipe_args(data, out, *extra))
    assert metrics["finished"] and metrics["global_batch"] == 16
    saved = json.loads((out / "config.json").read_text())
    prov = saved["recipe"]["provenance"]
    assert prov["data.batch_size"] == {"value": 16, "source": "--global-batch-size 16 / 1 ranks"}
    assert prov["recipe.global_batch_size"]["source"].startswith("command line")
    assert prov["optim.layer_decay"] == {"value": 0.85, "source": prov["optim.layer_decay"]["source"]}
    assert "run.sh --visual-ld 0.85" in prov["optim.layer_decay"]["source"]
    assert saved["data"]["batch_size"] == 16 and saved["optim"]["beta2"] == 0.999


def test_recipe_refuses_a_cache_pooled_otherwise(data, tmp_path):
    cfg = parse_config(_recipe_args(data, tmp_path, "--recipe", "llm2clip"))
    last = dataclasses.replace(spec(), pooling="last_token")
    with pytest.raises(
        ValueError, match=r"--expect-pooling mean \(from --recipe llm2clip\): c holds last_token-pooled"
    ):
        check_cache(cfg, last, "c")
    check_cache(
        parse_config(_recipe_args(data, tmp_path, "--recipe", "llm2clip", "--expect-pooling", "any")),
        last,
        "c",
    )
