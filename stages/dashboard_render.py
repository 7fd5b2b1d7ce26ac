"""SAEDashboard's feature-centric pages for chosen latents of atmpipe's SAEs, offline (`make dashboard`).

Run with .venv-dashboard's python (sae-dashboard and its pins live there); stages/dashboard_compare.py calls
it with the held-out token windows that atmpipe's browser reads:
    .venv-dashboard/bin/python stages/dashboard_render.py --tokens T.npy --latents 12,407 --d3 d3.min.js
        --out DIR SAE_DIR [SAE_DIR ...]
The model is loaded by TransformerLens (its usual processing but for centring the writing weights: the
residual stream as the model computes it, as atmpipe harvests it) from atmpipe's converted checkpoint through a local Hugging Face cache
layout (the one `make crosscheck` uses); each SAE by SAELens from its directory. Writes DIR/<sae>_feature_<j>.html
(SAEDashboard's page, its two CDN scripts replaced by local copies: plotly's own bundle and d3 v6 from npm)
and DIR/dashboard.json: per latent, what the page holds (activations, density, logit effects, tables).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crosscheck import HF_NAME, hf_cache_layout  # noqa: E402

CDN = {
    "https://d3js.org/d3.v6.min.js": "d3.v6.min.js",
    "https://cdn.plot.ly/plotly-latest.min.js": "plotly.min.js",
}


def load_model(model: str, work: Path, processing: bool = True):
    """gemma-3-270m in TransformerLens from atmpipe's converted checkpoint, with no hub access."""
    model_dir = Path(os.environ.get("ATMPIPE_HOME", Path.home() / ".cache" / "atmpipe")) / "models" / model
    # Before huggingface_hub is imported: it reads these once.
    os.environ |= {"HF_HOME": str(hf_cache_layout(model_dir, HF_NAME[model], work)), "HF_HUB_OFFLINE": "1"}
    import torch
    from sae_lens import HookedSAETransformer

    # TransformerLens's usual processing, as SAELens loads models: the norms' gains folded into the weights that
    # read the residual stream (so W_U carries the final norm's gain, as atmpipe's logit effects do); the
    # residual stream itself unchanged (writing weights not centred).
    if not processing:  # W_U without the final norm's gain: logit tables that rank other tokens
        return HookedSAETransformer.from_pretrained_no_processing(
            HF_NAME[model], device="cpu", dtype=torch.float32
        )
    return HookedSAETransformer.from_pretrained(
        HF_NAME[model], device="cpu", dtype=torch.float32, center_writing_weights=False
    )


def offline_scripts(out: Path, d3: Path) -> None:
    """Copy the two scripts SAEDashboard's pages load from CDNs beside them (the pages are then rewritten
    to load the copies): plotly's bundle ships with the plotly package, d3 v6 comes from npm."""
    import plotly

    bundle = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    (out / "plotly.min.js").write_bytes(bundle.read_bytes())
    (out / "d3.v6.min.js").write_bytes(d3.read_bytes())


def feature_summary(fd) -> dict:
    """What SAEDashboard's page holds for one feature, read from its own data objects."""
    groups = fd.sequence_data.seq_group_data
    top = groups[0].seq_data if groups else []
    tables = fd.feature_tables_data
    peak = max((max(s.feat_acts) for g in groups for s in g.seq_data if s.feat_acts), default=0.0)
    return {
        "density_title": fd.acts_histogram_data.title,
        "top_activation": peak,
        # its shading divides by that peak: top examples that show under a tenth of full colour
        "top_under_tenth_of_shading": sum(max(s.feat_acts, default=0.0) < 0.1 * peak for s in top),
        "top_repeated_text": len(top) - len({tuple(s.token_ids) for s in top}),
        "n_groups": len(groups),
        "groups": [{"title": g.title, "n": len(g.seq_data)} for g in groups],
        "tokens_per_sequence": max((len(s.token_ids) for g in groups for s in g.seq_data), default=0),
        "top_logits": list(
            zip(fd.logits_table_data.top_token_ids, fd.logits_table_data.top_logits, strict=True)
        ),
        "bottom_logits": list(
            zip(fd.logits_table_data.bottom_token_ids, fd.logits_table_data.bottom_logits, strict=True)
        ),
        "logits_histogram_bins": len(fd.logits_histogram_data.bar_heights),
        "acts_histogram_bins": len(fd.acts_histogram_data.bar_heights),
        "correlated_features": list(
            zip(tables.correlated_features_indices, tables.correlated_features_pearson, strict=True)
        ),
        "correlated_neurons": list(
            zip(tables.correlated_neurons_indices, tables.correlated_neurons_pearson, strict=True)
        ),
        "neuron_alignment": list(
            zip(tables.neuron_alignment_indices, tables.neuron_alignment_values, strict=True)
        ),
    }


def render_sae(
    sae_dir: Path, model, tokens, latents: list[int], out: Path, acts_cache: Path, ignore_bos: bool
) -> dict:
    """One SAE's pages for `latents`, and what each holds. With `ignore_bos`, every BOS token is left out, as
    atmpipe leaves them out (the store's windows hold a BOS before each document, not only at position 0)."""
    import torch
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    norms = sae.W_dec.detach().norm(dim=1)
    dec_norms = norms[latents].tolist()  # SAEDashboard folds these into the encoder
    unit = bool((norms - 1).abs().max() < 1e-5)
    if not unit and sae.cfg.architecture() == "topk":
        raise SystemExit(f"{sae_dir}: SAEDashboard folds decoder norms into the encoder, which SAELens refuses "
                         "for a TopK SAE whose decoder rows are not unit norm")  # fmt: skip
    if unit:  # folding unit norms changes nothing; SAELens refuses even that for TopK SAEs
        sae.fold_W_dec_norm = lambda: None
    cfg = SaeVisConfig(hook_point=sae.cfg.metadata.hook_name, features=latents, minibatch_size_features=64,
                       minibatch_size_tokens=16, device="cpu", dtype="float32", cache_dir=acts_cache,
                       ignore_tokens={model.tokenizer.bos_token_id} if ignore_bos else set(),
                       ignore_positions=[] if ignore_bos else [0])  # fmt: skip
    start = time.time()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=torch.from_numpy(tokens))
    seconds = time.time() - start
    base = out / f"{sae_dir.name}.html"
    save_feature_centric_vis(sae_vis_data=data, filename=base, separate_files=True)
    pages = {}
    for j, norm in zip(latents, dec_norms, strict=True):
        page = base.with_stem(f"{base.stem}_feature_{j}")
        html = page.read_text()
        for url, local in CDN.items():
            html = html.replace(url, local)
        page.write_text(html)
        pages[j] = feature_summary(data.feature_data_dict[j]) | {"page": page.name, "decoder_norm": norm}
    return {"seconds": seconds, "latents": pages}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("saes", nargs="+")
    p.add_argument("--tokens", required=True, help=".npy of token windows [n, context], BOS first")
    p.add_argument("--latents", required=True, help="per SAE, in order: comma lists joined by ';'")
    p.add_argument("--d3", required=True, help="d3 v6's d3.min.js (npm's d3@6 package)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--keep-bos", action="store_true", help="leave out position 0 only, not the BOS tokens inside windows"
    )
    p.add_argument(
        "--no-processing", action="store_true", help="load the LM with from_pretrained_no_processing"
    )
    args = p.parse_args()
    import numpy as np

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_sae = [[int(j) for j in spec.split(",")] for spec in args.latents.split(";")]
    work = Path(tempfile.mkdtemp(prefix="dashboard-"))
    meta = json.loads((Path(args.saes[0]) / "cfg.json").read_text())["metadata"]
    model = load_model(meta["model_name"], work / "hf", processing=not args.no_processing)
    tokens = np.load(args.tokens)
    offline_scripts(out, Path(args.d3))
    result = {
        "versions": {k: version(k) for k in ("sae-dashboard", "sae-lens", "transformer-lens", "torch")},
        "tokens": list(tokens.shape),
        "saes": {
            Path(s).name: render_sae(Path(s), model, tokens, js, out, work / "acts", not args.keep_bos)
            for s, js in zip(args.saes, per_sae, strict=True)
        },
    }
    (out / "dashboard.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
