"""The ground-truth arena's SAELens side (runs in .venv-peers, where SAELens lives; stages/groundtruth.py
drives it and passes everything through files):

    python stages/groundtruth_synth.py generate JOBS.json
        for each job {"spec": {...}, "out": OUT_DIR} (stages/groundtruth.toml says what a spec holds), a known dictionary and parent/child hierarchy built with `sae_lens.synthetic`, and samples from it:
        OUT_DIR/data.safetensors (train and held-out eval activations, the eval sample's true feature
        activations, the dictionary) and OUT_DIR/truth.json (the hierarchy, firing probabilities).
    python stages/groundtruth_synth.py evaluate JOBS.json
        for each job {"data": DATA_DIR, "sae": SAE_DIR, "out": OUT.json} (one process: SAELens imports once),
        SAELens's synthetic metrics (`eval_sae_on_synthetic_data`) of the SAE directory, loaded with
        `SAE.load_from_disk`, on the held-out sample, plus absorption on the known hierarchy (below) and the
        latents matched to the parents and to the children.

Absorption (docs/metrics.md, "Ground truth"): every true feature is matched to the live latent (one that
fires on the held-out sample) whose decoder row has the largest |cosine| with it. For each parent P (a feature with children) and each sample where P and at
least one of its children are active, the pair (sample, P) is *absorbed* when P's latent is silent and the
latent of an active child of P fires. The rate is absorbed pairs / eligible pairs, over all parents.

This module imports SAELens only inside the functions that need it, so the absorption measure can be
imported and tested from atmpipe's own venv.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

DATA = "data.safetensors"
TRUTH = "truth.json"


# --- absorption on the known hierarchy -----------------------------------------------------------


def match_latents(
    w_dec: torch.Tensor, features: torch.Tensor, live: torch.Tensor | None = None
) -> torch.Tensor:
    """For each true feature, the latent whose decoder row has the largest |cosine| with it, among the `live`
    latents (bool [d_sae]) when given: a dead latent's leftover direction would read as a silent match."""
    w = w_dec / w_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    f = features / features.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = (f @ w.T).abs()
    if live is not None and bool(live.any()):
        cos = cos.masked_fill(~live, -1.0)
    return cos.argmax(dim=1)


def absorption(fires: torch.Tensor, truth: torch.Tensor, children: dict[int, list[int]], match: torch.Tensor):
    """Absorbed and eligible (sample, parent) pairs: `fires` [n, d_sae] bool (latent fired), `truth` [n, N]
    bool (feature active), `children` parent feature → its child features, `match` feature → latent."""
    absorbed = eligible = 0
    per_parent = {}
    for parent, kids in children.items():
        kids_t = torch.tensor(kids)
        active_kids = truth[:, kids_t]  # [n, n_kids]
        rows = truth[:, parent] & active_kids.any(dim=1)
        kid_latent_fires = (active_kids & fires[:, match[kids_t]]).any(dim=1)
        hit = rows & ~fires[:, match[parent]] & kid_latent_fires
        per_parent[parent] = (int(hit.sum()), int(rows.sum()))
        absorbed += per_parent[parent][0]
        eligible += per_parent[parent][1]
    return {
        "rate": absorbed / eligible if eligible else None,
        "absorbed": absorbed,
        "eligible": eligible,
        "per_parent": {str(k): v for k, v in per_parent.items()},
    }


def hierarchy_children(tree: list[dict]) -> dict[int, list[int]]:
    """Parent feature → its child features, from Hierarchy.to_dict()'s roots (every level)."""
    out: dict[int, list[int]] = {}

    def walk(node: dict) -> None:
        kids = [c["feature_index"] for c in node["children"] if c["feature_index"] is not None]
        if node["feature_index"] is not None and kids:
            out[node["feature_index"]] = kids
        for c in node["children"]:
            walk(c)

    for root in tree:
        walk(root)
    return out


def feature_depths(tree: list[dict]) -> dict[int, int]:
    """Feature → its depth in the hierarchy (roots 0)."""
    out: dict[int, int] = {}

    def walk(node: dict, depth: int) -> None:
        if node["feature_index"] is not None:
            out[node["feature_index"]] = depth
        for c in node["children"]:
            walk(c, depth + 1)

    for root in tree:
        walk(root, 0)
    return out


# --- generate --------------------------------------------------------------------------------------


def generate(spec: dict, out: Path) -> None:
    """Dictionary, hierarchy and samples of one arena and seed (spec: see stages/groundtruth.toml)."""
    from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, HierarchyConfig, generate_hierarchy
    from safetensors.torch import save_file

    seed, n, d, h = spec["seed"], spec["n_features"], spec["d_model"], spec["hierarchy"]
    torch.manual_seed(seed)
    dictionary = FeatureDictionary(n, d, seed=seed)  # unit vectors, orthogonalised as far as d allows
    hierarchy = generate_hierarchy(
        n,
        HierarchyConfig(
            total_root_nodes=h["roots"],
            branching_factor=h["branching"],
            max_depth=h["depth"],
            mutually_exclusive_portion=h["mutually_exclusive"],
        ),
        seed=seed,
    )
    roots = hierarchy.to_dict()["roots"]
    children = hierarchy_children(roots)
    probs = torch.full((n,), float(spec["p_free"]))
    for feature, depth in feature_depths(roots).items():
        probs[feature] = float(h["p_depth"][depth])  # parents fire more often: their importance separates
    # Children fire only with their parent; SAELens's correction keeps their overall rates at `probs`.
    base = (probs * hierarchy.compute_probability_correction_factors(probs)).clamp(max=1.0)
    generator = ActivationGenerator(
        n, base, std_firing_magnitudes=spec["magnitude_std"], modify_activations=hierarchy.modifier
    )
    with torch.no_grad():
        train_f = generator.sample(spec["train_tokens"])
        eval_f = generator.sample(spec["eval_tokens"])
        tensors = {
            "train_acts": dictionary(train_f),
            "eval_acts": dictionary(eval_f),
            "eval_features": eval_f,
            "feature_vectors": dictionary.feature_vectors.detach(),
        }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / DATA))
    truth = {
        "spec": spec,
        "hierarchy": roots,
        "children": {str(k): v for k, v in children.items()},
        "firing_probability": (eval_f > 0).float().mean(0).tolist(),
        "true_l0": float((eval_f > 0).float().sum(1).mean()),
        "train_true_l0": float((train_f > 0).float().sum(1).mean()),
    }
    (out / (TRUTH + ".tmp")).write_text(json.dumps(truth))
    (out / (TRUTH + ".tmp")).replace(out / TRUTH)  # written last: its presence means the data is complete


# --- evaluate --------------------------------------------------------------------------------------


class StoredSample:
    """The held-out sample as an ActivationGenerator to eval_sae_on_synthetic_data: rows served in order."""

    def __init__(self, features: torch.Tensor):
        self.features, self.at = features, 0

    def sample(self, batch_size: int) -> torch.Tensor:
        rows = self.features[self.at : self.at + batch_size]
        self.at += batch_size
        return rows


def evaluate(data_dir: Path, sae_dir: Path) -> dict:
    from sae_lens import SAE
    from sae_lens.synthetic import FeatureDictionary, eval_sae_on_synthetic_data
    from safetensors.torch import load_file

    data = load_file(str(data_dir / DATA))
    truth = json.loads((data_dir / TRUTH).read_text())
    features, eval_f = data["feature_vectors"], data["eval_features"]
    dictionary = FeatureDictionary(*features.shape, initializer=None)
    with torch.no_grad():
        dictionary.feature_vectors.copy_(features)
    sae = SAE.load_from_disk(str(sae_dir))
    n = eval_f.shape[0]
    result = eval_sae_on_synthetic_data(sae, dictionary, StoredSample(eval_f), num_samples=n, batch_size=n)
    with torch.no_grad():
        fires = sae.encode(data["eval_acts"]) != 0
    match = match_latents(sae.W_dec.detach(), features, live=fires.any(dim=0))
    children = {int(k): v for k, v in truth["children"].items()}
    kids = sorted({c for v in children.values() for c in v})
    return {
        "saelens": result.to_dict(),
        "absorption": absorption(fires, eval_f > 0, children, match),
        "matched_latents": {"parents": match[sorted(children)].tolist(), "children": match[kids].tolist()},
        "true_l0": truth["true_l0"],
    }


def main(argv: list[str]) -> None:
    if argv[0] == "generate":
        for job in json.loads(Path(argv[1]).read_text()):
            generate(job["spec"], Path(job["out"]))
            print(f"generated {job['out']}", flush=True)
    elif argv[0] == "evaluate":
        for job in json.loads(Path(argv[1]).read_text()):
            result = evaluate(Path(job["data"]), Path(job["sae"]))
            tmp = Path(job["out"] + ".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(job["out"])  # a finished evaluation or none: resume skips it only when complete
            print(f"evaluated {job['sae']}", flush=True)
    else:
        raise SystemExit(f"unknown command {argv[0]!r}: generate | evaluate")


if __name__ == "__main__":
    main(sys.argv[1:])
