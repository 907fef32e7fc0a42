"""analyze(): every analysis on a checkpoint, statistics.json, figures; its command line."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_analysis_alignment import THREE, assert_png, modality_data, synthetic_data
from test_analysis_rda import save_checkpoint
from threads import single_thread

from decur_lightning.analysis import alignment_loss_per_dimension, analyze, collect_embeddings, load_ssl_module
from decur_lightning.analysis.cli import expand_layer_flags, main, run

from helpers import tiny_decur

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {
    "alignment_histogram",
    "embedding_tsne",
    "saliency_overlap",
    "band_importance",
    "saliency_examples",
    "band_permutation_importance",
}


def small_data():
    return synthetic_data(num_train=16, num_val=16, num_test=8, batch_size=8)


def fit_checkpoint(path: Path, **overrides) -> Path:
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=path.parent,
    )
    trainer.fit(tiny_decur(**overrides), small_data())
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    with single_thread():
        return fit_checkpoint(folder / "decur.ckpt"), fit_checkpoint(folder / "all_common.ckpt", common_ratio=1.0)


def test_analyze_writes_figures_and_statistics(checkpoints, tmp_path):
    decur, all_common = checkpoints
    stats = analyze(
        decur,
        small_data(),
        tmp_path / "out",
        max_samples=16,
        saliency_samples=4,
        ig_steps=4,
        layers="layer3",
        comparison_checkpoint=all_common,
        comparison_label="all common",
        tsne_threads=1,
        band_names={"optical": ["B2", "B3", "B4", "B8"]},
    )
    assert set(stats["figures"]) == FIGURES
    for path in stats["figures"].values():
        assert_png(Path(path))
    saved = json.loads((tmp_path / "out" / "statistics.json").read_text())
    assert saved == {k: v for k, v in stats.items() if k != "figures"}
    assert saved["modalities"] == ["sar", "optical"] and saved["pairs"] == ["sar_optical"]
    assert saved["common_dims"] == {"sar_optical": 48} and saved["num_samples"] == 16
    alignment = saved["alignment"]["sar_optical"]
    assert alignment["common"]["count"] == 48 and alignment["unique"]["count"] == 16
    assert set(saved["comparison"]["alignment"]["sar_optical"]) == {"all", "common", "unique"}
    saliency = saved["saliency"]
    assert saliency["num_samples"] == 4
    for name in ("common", "unique"):
        overlap = saliency["overlap"]["sar_optical"][name]
        assert overlap["count"] + overlap["undefined"] + overlap["degenerate"] == 4
        if overlap["count"]:
            assert 0.0 <= overlap["min"] <= overlap["max"] <= 1.0 + 1e-6
    optical = saliency["band_importance"]["optical"]
    assert optical["bands"] == ["B2", "B3", "B4", "B8"]
    assert sum(optical["unique"]["mean"]) == pytest.approx(1.0, abs=1e-5)
    assert saliency["band_importance"]["sar"]["bands"] == ["b1", "b2"]
    # the layer of the GradCAM maps and their size are recorded (layer3 is 2 x 2 at 32 px)
    assert saliency["gradcam_layers"]["sar"] == {"name": "layer3", "map_size": [2, 2], "degenerate": False}
    # the synthetic data knows its bands: the importance is scored against that truth
    truth = saliency["band_truth"]
    assert set(truth["per_modality"]) == {"sar", "optical"}
    assert truth["per_modality"]["sar"]["common"]["truth"] == "shared"
    assert 0.0 <= truth["per_modality"]["optical"]["unique"]["ranking"] <= 1.0
    # beside it, the band permutation importance on the same samples, scored against the same truth
    permutation = saliency["band_permutation"]
    assert permutation["num_samples"] == 4 and permutation["repeats"] == 5
    assert permutation["importance"]["optical"]["bands"] == ["B2", "B3", "B4", "B8"]
    for modality in ("sar", "optical"):
        for name in ("common", "unique"):
            assert sum(permutation["importance"][modality][name]["mean"]) == pytest.approx(1.0, abs=1e-5)
    assert permutation["band_truth"]["per_modality"]["optical"]["unique"]["truth"] == "private"
    assert permutation["band_truth"]["skill"] is not None
    arrays = np.load(tmp_path / "out" / "analysis.npz")
    assert arrays["alignment_sar_optical"].shape == (64,) and arrays["tsne_coordinates"].shape == (128, 2)
    assert arrays["comparison_alignment_sar_optical"].shape == (64,)
    assert arrays["band_importance_sar_common"].shape == (4, 2) and arrays["overlap_sar_optical_unique"].shape == (4,)
    assert arrays["band_permutation_importance_optical_unique"].shape == (5, 4)
    assert arrays["alignment_sar_optical"].mean() == pytest.approx(alignment["all"]["mean"], rel=1e-5)


def test_analyze_says_when_the_maps_are_degenerate(checkpoints, tmp_path):
    """Issue 18: 1 x 1 GradCAM maps give overlap 1.0 or undefined; statistics.json must not
    report them as a result, and must say which layer and why."""
    with pytest.warns(UserWarning, match="no spatial"):
        stats = analyze(
            checkpoints[0],
            small_data(),
            tmp_path,
            max_samples=8,
            saliency_samples=3,
            ig_steps=2,
            layers="layer4",
            tsne=False,
        )
    saliency = stats["saliency"]
    assert saliency["gradcam_layers"]["optical"] == {"name": "layer4", "map_size": [1, 1], "degenerate": True}
    for name in ("common", "unique"):
        overlap = saliency["overlap"]["sar_optical"][name]
        assert overlap["count"] == 0 and overlap["undefined"] + overlap["degenerate"] == 3
        assert "no overlap statistic" in overlap["note"] and "mean" not in overlap
    # by default the layer is chosen with maps of at least 4 x 4 (layer2 at 32 px)
    stats = analyze(
        checkpoints[0], small_data(), tmp_path / "auto", max_samples=8, saliency_samples=2, ig_steps=2, tsne=False
    )
    assert stats["saliency"]["gradcam_layers"]["sar"] == {"name": "layer2", "map_size": [4, 4], "degenerate": False}


def test_analyze_without_tsne_and_saliency(checkpoints, tmp_path):
    stats = analyze(checkpoints[0], small_data(), tmp_path, split="test", max_samples=8, saliency_samples=0, tsne=False)
    assert set(stats["figures"]) == {"alignment_histogram"} and "saliency" not in stats
    with pytest.raises(ValueError, match="permutation_repeats"):
        analyze(checkpoints[0], small_data(), tmp_path, saliency_samples=0, tsne=False, permutation_repeats=-1)
    assert stats["num_samples"] == 8 and stats["split"] == "test"


def test_load_errors_are_actionable(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt"):
        load_ssl_module(tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="decur_lightning.ssl"):
        load_ssl_module(checkpoints[0], "NoSuchModule")
    assert load_ssl_module(checkpoints[0], "decur_lightning.ssl.DeCURModule").common_dims == 48
    with pytest.raises(ValueError, match="split"):
        analyze(checkpoints[0], small_data(), tmp_path, split="train")
    old = tmp_path / "numbered.ckpt"  # a checkpoint of version 0.1: numbered modalities
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {
                "encoder1": "resnet18",
                "encoder2": "resnet18",
                "modality1": "sar",
                "modality2": "optical",
            },
            "pytorch-lightning_version": L.__version__,
        },
        old,
    )
    with pytest.raises(ValueError, match=r"0\.1 \(numbered modalities\).*'weights'"):
        load_ssl_module(old)


def test_command_line_with_the_fit_config(checkpoints, tmp_path, capsys):
    """The YAML of the `decur fit` run is accepted: its data section is used, the rest ignored.

    ``main`` is the console script: it must return None (a returned dict would become exit status 1).
    """
    assert (
        main(
            [
                "--config",
                str(ROOT / "examples" / "configs" / "quickstart.yaml"),
                "--checkpoint",
                str(checkpoints[0]),
                "--out",
                str(tmp_path / "cli"),
                "--data.init_args.num_train=16",
                "--data.init_args.num_val=16",
                "--data.init_args.batch_size=8",
                "--max_samples=16",
                "--saliency_samples=2",
                "--ig_steps=2",
                "--tsne=false",
                "--permutation_repeats=2",
                "--layer",
                "sar=layer3",
                "--layer",
                "optical=layer3",
            ]
        )
        is None
    )
    printed = capsys.readouterr().out
    assert "statistics.json" in printed
    summary = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    assert set(summary["band_truth"]) == {"integrated_gradients", "band_permutation"}
    assert set(summary["band_truth"]["band_permutation"]) == {"skill", "ranking"}
    saved = json.loads((tmp_path / "cli" / "statistics.json").read_text())
    assert saved["num_samples"] == 16 and saved["saliency"]["num_samples"] == 2
    assert (tmp_path / "cli" / "band_importance.png").is_file()
    permutation = saved["saliency"]["band_permutation"]
    assert (
        permutation["repeats"] == 2 and permutation["band_truth"]["per_modality"]["sar"]["common"]["truth"] == "shared"
    )
    assert (tmp_path / "cli" / "band_permutation_importance.png").is_file()


def test_command_line_with_a_data_only_config(checkpoints, tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n  class_path: SyntheticMultimodalDataModule\n  init_args:\n"
        "    num_train: 8\n    num_val: 8\n    batch_size: 4\n"
        "saliency_samples: 0\ntsne: false\n"
    )
    stats = run(["--config", str(config), "--checkpoint", str(checkpoints[0]), "--out", str(tmp_path / "o")])
    assert stats["num_samples"] == 8 and set(stats["figures"]) == {"alignment_histogram"}
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoints[0]), "--out", str(tmp_path / "o")])  # no data given


def test_layer_flags_by_name(checkpoints, tmp_path):
    assert expand_layer_flags(["--layer", "sar=layer3", "--layer=optical=layer2", "--layer", "layer4", "--x"]) == [
        "--layer.sar=layer3",
        "--layer.optical=layer2",
        "--layer",
        "layer4",
        "--x",
    ]
    args = [
        "--checkpoint",
        str(checkpoints[0]),
        "--out",
        str(tmp_path / "o"),
        "--data",
        "SyntheticMultimodalDataModule",
        "--data.num_train=8",
        "--data.num_val=8",
        "--data.batch_size=4",
        "--tsne=false",
        "--saliency_samples=0",
    ]
    with pytest.raises(ValueError, match=r"layers names \['dem'\].*\['sar', 'optical'\]"):
        run([*args, "--layer", "dem=layer3"])
    with pytest.raises(ValueError, match=r"band_names names \['s2'\]"):
        run([*args, "--band_names", "{s2: [B2]}"])
    with pytest.raises(SystemExit):
        run([*args, "--layer1=layer3"])  # the numbered flags are gone


def test_three_modalities_every_pair_gets_figures_and_statistics(tmp_path):
    """An untrained 3-modality checkpoint: alignment, overlap and their figures for each pair;
    band importance and band names by modality; the CLI reads the modalities from the checkpoint."""
    torch.manual_seed(0)
    modalities = {"sar": {"bands": 2, "band_names": ["VV", "VH"]}, "optical": 4, "dem": 1}
    path = save_checkpoint(tiny_decur(modalities=modalities), tmp_path / "three.ckpt")
    data = modality_data(THREE, num_samples=8, batch_size=4)
    stats = analyze(
        path,
        data,
        tmp_path / "out",
        max_samples=8,
        saliency_samples=2,
        ig_steps=2,
        layers={"sar": "layer3", "optical": "layer3", "dem": "layer3"},
        tsne_threads=1,
        band_names={"optical": ["B2", "B3", "B4", "B8"]},
    )
    pairs = ["sar_optical", "sar_dem", "optical_dem"]
    assert stats["modalities"] == ["sar", "optical", "dem"] and stats["pairs"] == pairs
    assert stats["common_dims"] == dict.fromkeys(pairs, 48)
    expected = {
        f"{kind}_{pair}" for kind in ("alignment_histogram", "saliency_overlap", "saliency_examples") for pair in pairs
    } | {"embedding_tsne", "band_importance", "band_permutation_importance"}
    assert set(stats["figures"]) == expected
    for name, figure in stats["figures"].items():
        assert Path(figure) == tmp_path / "out" / f"{name}.png"
        assert_png(Path(figure))
    arrays = np.load(tmp_path / "out" / "analysis.npz")
    model = load_ssl_module(path)
    embeddings = collect_embeddings(model, data.val_dataloader(), 8)
    for pair in pairs:
        m, n = pair.split("_")
        assert stats["alignment"][pair]["common"]["count"] == 48 and stats["alignment"][pair]["unique"]["count"] == 16
        expected_alignment = alignment_loss_per_dimension(embeddings[m], embeddings[n]).numpy()
        np.testing.assert_allclose(arrays[f"alignment_{pair}"], expected_alignment, rtol=1e-5, atol=1e-6)
        for output in ("common", "unique"):
            overlap = stats["saliency"]["overlap"][pair][output]
            assert overlap["count"] + overlap["undefined"] == 2
            assert arrays[f"overlap_{pair}_{output}"].shape == (2,)
    bands = stats["saliency"]["band_importance"]
    assert bands["sar"]["bands"] == ["VV", "VH"]  # recorded in the checkpoint's modality description
    assert bands["optical"]["bands"] == ["B2", "B3", "B4", "B8"] and bands["dem"]["bands"] == ["b1"]
    assert bands["dem"]["common"]["mean"] == pytest.approx([1.0])
    permutation = stats["saliency"]["band_permutation"]["importance"]
    assert permutation["dem"]["unique"]["mean"] == pytest.approx([1.0]) and permutation["sar"]["bands"] == ["VV", "VH"]
    assert arrays["tsne_coordinates"].shape == (3 * 64, 2) and list(arrays["tsne_modality"][::64]) == list(THREE)
