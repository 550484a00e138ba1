"""CLIP_benchmark (clip-benchmark on PyPI): our metrics against its metric functions on the same
features, its wds layout read as its own builder reads it, and its CLI with the llm2clip model
type against python -m llm2clip.eval on the same bundle and sets.

Discrete metrics are compared exactly only on the same features, or where every score gap is far
above what batching can change (checked here, not assumed).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from llm2clip.data.images import eval_transform
from llm2clip.evaluation import benchmark_classification, benchmark_retrieval, load_benchmark_set
from llm2clip.evaluation.benchmark import benchmark_layout
from tests.eval_fixtures import (
    CLASSNAMES,
    IMAGE_SIZE,
    TEMPLATES,
    shared_bundle,
    write_benchmark_classification,
    write_benchmark_retrieval,
)

cb_retrieval = pytest.importorskip(
    "clip_benchmark.metrics.zeroshot_retrieval", reason="clip-benchmark is not installed (test extra)"
)
cb_classification = pytest.importorskip(
    "clip_benchmark.metrics.zeroshot_classification", reason="clip-benchmark is not installed (test extra)"
)


def _min_gap(sim: torch.Tensor) -> float:
    """Smallest difference between two scores of one row: no ranking can flip below it."""
    s = sim.double().sort(dim=1).values
    return float((s[:, 1:] - s[:, :-1]).min())


def test_metrics_equal_clip_benchmark_functions():
    g = torch.Generator().manual_seed(3)
    n, d = 20, 16
    per_image = torch.randint(1, 4, (n,), generator=g)
    per_image[7] = 0  # an image without captions: a miss for clip_benchmark's text retrieval
    t2i = torch.repeat_interleave(torch.arange(n), per_image)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(len(t2i), d, generator=g), dim=-1)
    scores = txt @ img.T  # clip_benchmark: texts x images
    assert _min_gap(scores) > 1e-5 and _min_gap(scores.T) > 1e-5  # the fixture has no near-ties
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(t2i)), t2i] = True
    ks = (1, 2, 5, 10)
    for chunk in (7, 1 << 24):  # ragged blocks, one block
        ours = benchmark_retrieval(img, txt, t2i, ks, chunk_elems=chunk)
        for k in ks:
            image_r = cb_retrieval.batchify(cb_retrieval.recall_at_k, scores, positive, 8, "cpu", k=k) > 0
            text_r = cb_retrieval.batchify(cb_retrieval.recall_at_k, scores.T, positive.T, 8, "cpu", k=k) > 0
            assert ours[f"image_retrieval_recall@{k}"] == image_r.float().mean().item(), k
            assert ours[f"text_retrieval_recall@{k}"] == text_r.float().mean().item(), k
    assert ours["chance_image_retrieval_recall@1"] == 1 / n and ours["N"] == n and ours["M"] == len(t2i)

    from sklearn.metrics import balanced_accuracy_score

    for c, classes_used in ((7, 6), (3, 3)):  # class 6 never occurs in the labels; 3 < 5 classes
        labels = torch.randint(0, classes_used, (40,), generator=g)
        feats = F.normalize(torch.randn(40, d, generator=g), dim=-1)
        classifier = F.normalize(torch.randn(c, d, generator=g), dim=-1)
        logits = 100.0 * feats @ classifier.T  # theirs: 100. * image_features @ classifier (D, C)
        assert _min_gap(logits) > 1e-3
        ours = benchmark_classification(feats, classifier, labels, chunk_elems=11)
        topk = (1, 5) if c >= 5 else (1,)
        acc = _their_accuracy(logits, labels, topk)
        assert ours["acc1"] == acc[0] and ours["acc5"] == (acc[1] if c >= 5 else None)
        assert ours["mean_per_class_recall"] == balanced_accuracy_score(labels, logits.argmax(axis=1))
        assert ours["chance_acc1"] == 1 / c and ours["C"] == c


def _their_accuracy(logits, labels, topk):
    """clip_benchmark's accuracy(); under numpy >= 2.4 it raises TypeError (float() of a 1-element
    array) and register() installs accuracy_compat in its place: that one then."""
    from llm2clip.evaluation.clip_benchmark import accuracy_compat

    try:
        return cb_classification.accuracy(logits, labels, topk=topk)
    except TypeError:
        return accuracy_compat(logits, labels, topk=topk)


class _Words:
    """A stand-in text embedder: a fixed vector per word, summed (no LLM needed to read a layout)."""

    def encode(self, texts):
        def vec(t):
            g = torch.Generator().manual_seed(sum(map(ord, t)) % 10007)
            return torch.randn(8, generator=g)

        return torch.stack([sum((vec(w) for w in t.split()), torch.zeros(8)) for t in texts])


def test_wds_layout_is_read_as_clip_benchmark_reads_it(tmp_path):
    from clip_benchmark.datasets.builder import build_wds_dataset

    root = write_benchmark_retrieval(tmp_path / "wds_captions", blank=True)
    theirs = list(build_wds_dataset("wds_captions", eval_transform(IMAGE_SIZE), "test", str(root)))
    ours = load_benchmark_set(root, "test", IMAGE_SIZE, _Words())
    assert ours.protocol == "clip_benchmark" and (ours.dataset, ours.split) == ("wds_captions", "test")
    assert ours.images.shape[0] == len(theirs) == 8
    for i, (image, captions) in enumerate(theirs):
        assert torch.equal(ours.images[i], image)  # png, jpg and webp decoded alike
        kept = [c for c in captions if c.strip()]  # blank lines: theirs embeds "", ours drops them
        assert [ours.captions[j] for j in range(len(ours.captions)) if ours.text_to_image[j] == i] == kept
    assert ours.counts["blank_captions"] == 2 and ours.counts["images_without_captions"] == 1

    root = write_benchmark_classification(tmp_path / "wds_classes")
    theirs_ds = build_wds_dataset("wds_classes", eval_transform(IMAGE_SIZE), "test", str(root))
    theirs = list(theirs_ds)
    ours = load_benchmark_set(root, "test", IMAGE_SIZE, _Words())
    assert (
        ours.classnames == theirs_ds.classes == CLASSNAMES
        and ours.templates == theirs_ds.templates == TEMPLATES
    )
    assert ours.labels.tolist() == [label for _, label in theirs]
    assert all(torch.equal(ours.images[i], image) for i, (image, _) in enumerate(theirs))
    with pytest.raises(ValueError, match="no .*nshards.txt"):
        benchmark_layout(root, "train")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_bundle(tmp_path_factory)


def _boundary_gap(sim: torch.Tensor, ks) -> float:
    """Smallest gap between the k-th and (k+1)-th best score of a row, over rows and k: a top-k
    set cannot change while the scores move by less than half of it."""
    s = sim.double().sort(dim=1, descending=True).values
    return min(float((s[:, k - 1] - s[:, k]).min()) for k in ks if k < s.shape[1])


def _features(model, s, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and caption (or class) features computed `batch` images at a time."""
    img, txt = [], []
    with torch.no_grad():
        for a in range(0, s.images.shape[0], batch):
            img.append(model.encode_image(s.images[a : a + batch]).float())
        if hasattr(s, "captions"):
            for a in range(0, len(s.captions), batch):
                txt.append(model.encode_text(s.captions[a : a + batch]).float())
            return torch.cat(img), torch.cat(txt)
        for c in s.classnames:  # clip_benchmark's classifier: a class's templates per call
            f = F.normalize(model.encode_text([t.replace("{c}", c) for t in s.templates]).float(), dim=-1)
            txt.append(F.normalize(f.mean(0), dim=-1))
    return torch.cat(img), torch.stack(txt)


def _check_margins(model, s, ks) -> None:
    """The fixture's top-k boundaries are far wider than what batching changes in the scores, so
    llm2clip.eval and clip_benchmark (other batches) must rank alike: checked, not assumed."""
    img_a, txt_a = _features(model, s, 1000)
    img_b, txt_b = _features(model, s, 3)
    sim_a, sim_b = img_a @ txt_a.T, img_b @ txt_b.T
    noise = float((sim_a - sim_b).abs().max())
    gap = min(_boundary_gap(sim_a, ks), _boundary_gap(sim_a.T, ks))
    print(f"score change across batchings {noise:.2e}, smallest top-k boundary gap {gap:.2e}")
    assert gap > 10 * noise + 1e-6


def test_clip_benchmark_cli_with_the_llm2clip_type_agrees_with_llm2clip_eval(bundle, tmp_path, capsys):
    import llm2clip
    from llm2clip.apps.clip_benchmark import main as cb_main
    from llm2clip.apps.eval import main as eval_main

    retrieval = write_benchmark_retrieval(tmp_path / "wds_captions", images=10, seed=2)
    classes = write_benchmark_classification(tmp_path / "wds_classes", images=21)
    model = llm2clip.load(bundle.bundle)
    ours = eval_main([
        "--checkpoint", str(bundle.bundle), "--clip-benchmark", str(retrieval), str(classes),
        "--recall-k", "1", "2", "5", "--device", "cpu", "--batch-size", "4",
    ])["results"]  # fmt: skip
    printed = capsys.readouterr().out
    assert (
        "wds_captions/test: wds_captions [test], 10 images, 19 captions, clip_benchmark protocol" in printed
    )
    assert "definitions:" in printed and "text_retrieval_recall@k" in printed
    for task, root, name, ks in (
        ("zeroshot_retrieval", retrieval, "wds_captions", (1, 2, 5)),
        ("zeroshot_classification", classes, "wds_classes", (1, 5)),
    ):
        _check_margins(model, load_benchmark_set(root, "test", IMAGE_SIZE, model.embedder), ks)
        out = tmp_path / f"{name}.json"
        cb_main([
            "eval", "--model_type", "llm2clip", "--model", "llm2clip", "--pretrained", str(bundle.bundle),
            "--dataset", f"wds/{name}", "--dataset_root", str(root), "--task", task,
            "--recall_k", "1", "2", "5",
            "--no_amp", "--num_workers", "0", "--batch_size", "4", "--output", str(out), "--quiet",
        ])  # fmt: skip
        theirs = json.loads(out.read_text())["metrics"]
        mine = ours[f"{name}/test"]
        print(name, theirs, {k: mine[k] for k in theirs})
        assert {k: mine[k] for k in theirs} == theirs
    assert ours["wds_classes/test"]["C"] == 7 and ours["wds_captions/test"]["M"] == 19
