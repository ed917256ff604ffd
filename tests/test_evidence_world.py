"""The committed evidence world (data/toy_world, built by scripts/build_toy_world.py): small, described truthfully
by its gate report, and usable by the project's unchanged training scripts and pipeline."""

from __future__ import annotations

import json
import pickle
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import build_toy_world  # noqa: E402

from utils import toy_world as world  # noqa: E402

WORLD = REPO_ROOT / "data" / "toy_world"
pytestmark = pytest.mark.xdist_group("toy_world")


def committed_report() -> dict:
    return json.loads((WORLD / "build_report.json").read_text())


def test_world_is_small_and_its_report_is_consistent():
    size = sum(path.stat().st_size for path in WORLD.rglob("*") if path.is_file())
    assert size < 20 * 2 ** 20, f"{size / 2 ** 20:.1f} MiB"
    report = committed_report()
    assert report["samples"] >= 200 and set(report["accuracy"]) == set(build_toy_world.GATES)
    passed = all(report["accuracy"][key] >= gate for key, gate in build_toy_world.GATES.items()) \
        and report["vae_concept_fidelity"] >= build_toy_world.VAE_FIDELITY_GATE
    assert report["passed"] == passed
    assert passed, (report["accuracy"], report["vae_concept_fidelity"])  # every gate holds
    # the scripts train and sample with the shift the world was pretrained with: it is in the scheduler's config
    scheduler = json.loads((WORLD / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == report["build"]["shift"]


def test_growing_the_vae_changes_nothing_it_computes():
    """grow_vae adds resnets that start as the identity: the grown VAE's latents and reconstructions are bitwise
    those of the VAE it grew from, with twice the resnets per block."""
    torch.set_num_threads(1)
    args = build_toy_world.parse_args([])
    torch.manual_seed(0)
    vae = build_toy_world.make_vae(args, 1)
    with torch.no_grad():  # random non-zero weights everywhere, so an unchanged output means something
        for param in vae.parameters():
            param.normal_(0, 0.05)
    grown = build_toy_world.grow_vae(vae, args)
    assert grown.config.layers_per_block == 2 and len(grown.decoder.up_blocks[0].resnets) == 3
    pixels = build_toy_world.to_pixels(np.stack([world.render(s) for s in world.all_scenes()[:3]]))
    with torch.no_grad():
        latents, grown_latents = vae.encode(pixels).latent_dist.mean, grown.encode(pixels).latent_dist.mean
        assert torch.equal(latents, grown_latents)
        assert torch.equal(vae.decode(latents).sample, grown.decode(latents).sample)


def test_decoder_phase_leaves_the_encoder_and_so_the_latent_space_alone():
    """build_toy_world.train_vae's second phase grows the VAE and trains the decoder only: with no joint steps, the
    encoder still computes what the initial one did and the decoder has moved."""
    torch.set_num_threads(1)
    args = build_toy_world.parse_args(["--vae_steps", "0", "--decoder_steps", "2", "--vae_batch_size", "2"])
    scenes = np.stack([world.render(scene) for scene in world.all_scenes()[:4]])
    torch.manual_seed(args.seed * 1000 + 11)  # train_vae's own seed: the same initial weights
    initial = build_toy_world.make_vae(args, args.vae_layers_per_block)
    trained = build_toy_world.train_vae(args, scenes)
    before, after = initial.state_dict(), trained.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    pixels = build_toy_world.to_pixels(scenes)
    with torch.no_grad():
        assert torch.equal(initial.encode(pixels).latent_dist.mean, trained.encode(pixels).latent_dist.mean)
    # --vae_only keeps a transformer trained on the initial encoder: it accepts this VAE, and refuses another one
    trained.register_to_config(shift_factor=0.1, scaling_factor=2.0)
    initial.register_to_config(shift_factor=0.1, scaling_factor=2.0)
    build_toy_world.require_same_encoder(trained, initial)
    with torch.no_grad():
        initial.encoder.conv_in.weight.mul_(1.01)
    with pytest.raises(SystemExit, match="--vae_only: the new encoder differs"):
        build_toy_world.require_same_encoder(trained, initial)


def test_world_reproduces_its_gate_report():
    """The build's own measurement repeated on its first 30 fixed-seed samples (the report keeps every sample's
    result), and the VAE round trip of the concept: the committed model is the one its report describes."""
    torch.set_num_threads(1)
    committed = committed_report()
    pipe = StableDiffusion3Pipeline.from_pretrained(str(WORLD / "model"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scenes = build_toy_world.eval_scenes(committed["samples"], seed=1234)[:30]
    hits = build_toy_world.attribute_hits(pipe, scenes, committed["eval_steps"], committed["guidance_scale"])
    for key, value in hits.items():
        differing = sum(a != b for a, b in zip(value, committed["hits"][key][:30]))
        assert differing <= 1, (key, value, committed["hits"][key][:30])  # 1 of 30 for floating-point ties
    args = build_toy_world.parse_args(["--output_dir", str(WORLD)])
    assert np.mean(build_toy_world.vae_fidelities(pipe.vae, args)) == pytest.approx(
        committed["vae_concept_fidelity"], abs=0.01)


def test_short_runs_on_the_world_load_and_change_its_samples(tmp_path):
    """30-step stage 1 and stage 2 through the unchanged scripts; their LoRAs load into the world's pipeline and
    change what it draws for the concept prompt."""
    import train_stage1_sd3
    import train_stage2_v2_sd3

    from utils.generation import add_loras

    common = ["--pretrained_model_name_or_path", str(WORLD / "model"), "--data_path", str(WORLD), "--csv_name",
              "sks_toy.csv", "--resolution", "32", "--max_sequence_length", "16", "--max_train_steps", "30",
              "--learning_rate", "2e-3", "--report_to", "none", "--checkpointing_steps", "1000"]
    extractor = tmp_path / "base_ckpt" / "sks_toy"
    train_stage1_sd3.main(common + ["--output_dir", str(extractor), "--stage1_prompt_column", "prompt"])
    train_stage2_v2_sd3.main(common + ["--output_dir", str(tmp_path), "--stage1_output_dir", str(extractor),
                                       "--eta", "1.0"])

    pipe = StableDiffusion3Pipeline.from_pretrained(str(WORLD / "model"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = [world.caption(world.concept_scene(bg, pos)) for bg, pos in world.CONCEPT_SCENES[:3]]

    def draw():
        out = pipe(prompt=prompts, num_inference_steps=8, guidance_scale=5.0, height=32, width=32,
                   generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
                   max_sequence_length=16, output_type="np").images
        return np.asarray(out)

    base = draw()
    names = add_loras(pipe, [extractor, tmp_path / "sks_toy"], [None, None])
    for name in names:
        pipe.set_adapters([name], adapter_weights=[1.0])
        change = np.abs(draw() - base).mean()
        assert change > 0.005, (name, change)  # > ~1.3 grey levels on average


def test_evidence_script_trains_scores_and_reports(tmp_path):
    """scripts/evidence.py end to end at a tiny budget: every requested model is a table row, the base model
    agrees with itself exactly, the stage-2 rows carry the PureCC statistics and the grid has one strip per row.
    (One training process: two spawn fresh interpreters, ~15 s more here; the full 3-seed table was checked equal
    for --jobs 1 and 2, docs/evidence.md.)"""
    import evidence
    from PIL import Image

    out = tmp_path / "ev"
    assert evidence.main(["--seeds", "0", "--steps", "3", "--jobs", "1", "--variants", "stage1,purecc",
                          "--concept_prompts", "2", "--plain_prompts", "2", "--sample_steps", "2",
                          "--stage1_every", "2", "--output_dir", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    summary = report["summary"]
    labels = ["base model", evidence.VARIANTS["stage1"][0], evidence.VARIANTS["purecc"][0]]
    assert list(summary) == labels
    base = summary["base model"]
    assert base["agrees_with_base"]["mean"] == 1.0 and base["pixel_change"]["mean"] == 0.0
    assert base["layout_iou"]["mean"] is not None and base["pure_share"]["mean"] is None
    assert summary[labels[1]]["lambda_mean"]["mean"] is None
    purecc = summary[labels[2]]
    assert 0.0 < purecc["pure_share"]["mean"] < 1.0 and 0.0 <= purecc["lambda_at_min"]["mean"] <= 1.0
    # stage 1's trajectory: the base model, its checkpoint at step 2, the final model; the final point is the row
    [trajectory] = report["stage1_trajectory"].values()
    assert [point["step"] for point in trajectory] == [0, 2, 3]
    assert trajectory[0]["pixel_change"] == 0.0 and trajectory[0]["agrees_with_base"] == 1.0
    assert trajectory[-1]["fidelity"] == report["per_seed"][labels[1]][0]["fidelity"]
    assert list(report["equal_fidelity"]) == [labels[2]]  # stage 2 compared with stage 1
    table = (out / "results.md").read_text().split("\n\n")
    assert len(table[0].splitlines()) == 2 + len(labels) and all(label in table[0] for label in labels)
    assert table[-1].splitlines()[-1].startswith(f"| {labels[2]} |")
    assert Image.open(out / "grid.png").size == (3 * 4 * world.SIZE, 3 * len(labels) * world.SIZE)
    assert not (out / "seed0").exists()  # the LoRAs are removed, the numbers kept


def test_stage1_at_equal_fidelity_is_interpolated_between_its_checkpoints():
    """Stage 1 at 0.0 / 0.4 / 0.8 fidelity after 0 / 100 / 200 steps, pixel change 0 / 0.02 / 0.06: fidelity 0.6 is
    first reached half-way between steps 100 and 200, where the pixel change is 0.04; 0.9 is never reached."""
    import evidence

    def point(fidelity, change):
        return {"fidelity": fidelity, "pixel_change": change, "agrees_with_base": 1.0 - change,
                "attribute_accuracy": 1.0, "context_kept": 1.0, "layout_iou": 1.0}

    trajectory = [(0, point(0.0, 0.0)), (100, point(0.4, 0.02)), (200, point(0.8, 0.06)), (300, point(0.7, 0.07))]
    match = evidence.at_fidelity(trajectory, 0.6)
    assert match["step"] == pytest.approx(150) and match["pixel_change"] == pytest.approx(0.04)
    assert match["agrees_with_base"] == pytest.approx(0.96)
    assert evidence.at_fidelity(trajectory, 0.9) is None
    runs = {"m": {0: point(0.6, 0.01), 1: point(0.9, 0.0)}}
    rows = evidence.equal_fidelity_rows(runs, {0: trajectory, 1: trajectory})
    assert rows["m"]["seeds_reached"] == (1, 2)
    assert rows["m"]["pixel_change"][0] == pytest.approx(0.01 - 0.04)


def test_evidence_script_rejects_an_unknown_variant(tmp_path):
    import evidence

    with pytest.raises(SystemExit, match="--variants: unknown \\['nope'\\]"):
        evidence.main(["--variants", "stage1,nope", "--output_dir", str(tmp_path)])


def test_decoder_phase_in_a_second_process_gives_the_sequential_vae(tmp_path, monkeypatch):
    """The parallel build (the default; --no_decoder_in_parallel turns it off) hands the first phase's VAE and both
    generators to a second process through files: what that process trains is bitwise the VAE of the sequential
    order. The function the process runs is called here in this process (a spawned one would pay ~12 s of imports);
    the arguments it is spawned with must pickle."""
    torch.set_num_threads(1)
    args = build_toy_world.parse_args(["--vae_steps", "2", "--decoder_steps", "2", "--vae_batch_size", "2"])
    first_scenes = world.all_scenes()[:4]
    monkeypatch.setattr(world, "all_scenes", lambda: first_scenes)  # the second process renders world.all_scenes()
    scenes = np.stack([world.render(scene) for scene in first_scenes])
    sequential = build_toy_world.train_vae(args, scenes)

    vae, rng = build_toy_world.train_encoder(args, scenes)
    build_toy_world.hand_off_decoder_phase(vae, rng, tmp_path)
    pickle.dumps((vars(args), str(tmp_path)))
    torch.manual_seed(12345)  # the second process starts from the handed-off generators, not from this state
    build_toy_world.run_decoder_phase(vars(args), str(tmp_path))
    done = SimpleNamespace(join=lambda: None, exitcode=0)  # a joined process that exited cleanly
    finished = build_toy_world.finish_decoder_phase(done, args, tmp_path, scenes)
    expected, got = sequential.state_dict(), finished.state_dict()
    assert expected.keys() == got.keys() and finished.config.layers_per_block == args.decoder_layers_per_block
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert (finished.config.shift_factor, finished.config.scaling_factor) == \
        (sequential.config.shift_factor, sequential.config.scaling_factor)
    with pytest.raises(SystemExit, match="exit code 1.*--vae_only"):
        build_toy_world.finish_decoder_phase(SimpleNamespace(join=lambda: None, exitcode=1), args, tmp_path, scenes)
