"""One-off check (kept to say how the number beside it was measured): score the average of a search's CMA-ES means,
taken from its committed states, on the search's validation prompts exactly as the trainer validates its mean.

    python results/language/plateau-average/average_means.py training/namm-c75 d87358c,6779103,WT

(WT = the working tree's state; here generation 140, before it was committed.) Writes runs/avg-<search>.json."""
import json, shutil, subprocess, sys
from pathlib import Path
import torch
from safetensors.torch import load as st_load
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts")); sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)
from train_namm import load_model, model_files_hash
from namm_transfer.evolution.trainer import TrainConfig, Trainer, MODEL_DTYPES

run = sys.argv[1]            # e.g. training/namm-c75
commits = sys.argv[2].split(",")   # commits whose state to average; "WT" = the working tree
tmp = Path("/tmp") / ("avg-" + Path(run).name)
shutil.rmtree(tmp, ignore_errors=True); shutil.copytree(ROOT / run, tmp)
(tmp / ".lock").unlink(missing_ok=True)
info = json.loads((tmp / "state.json").read_text())
cfg = TrainConfig.from_dict({**info["config"], "out": str(tmp)})
stats_mean = st_load((ROOT / run / "state.safetensors").read_bytes())["stats_mean"]  # frozen since generation 0
means, gens = [], []
for c in commits:
    if c == "WT":
        blob = (ROOT / run / "state.safetensors").read_bytes(); js = (ROOT / run / "state.json").read_text()
    else:
        blob = subprocess.run(["git", "show", f"{c}:{run}/state.safetensors"], capture_output=True, check=True,
                              cwd=ROOT).stdout
        js = subprocess.run(["git", "show", f"{c}:{run}/state.json"], capture_output=True, check=True, cwd=ROOT,
                            text=True).stdout
    t = st_load(blob); means.append(t["es_mean"]); gens.append(json.loads(js)["es"]["generation"])
    assert torch.equal(t["stats_mean"], stats_mean)
model, tok = load_model(cfg.model, "cpu", MODEL_DTYPES[cfg.dtype])
tr = Trainer(cfg, model, tok, "cpu", model_hash=model_files_hash(cfg.model))
assert tr.try_resume()
avg = torch.stack(means).mean(0)
print("gens", gens, "norms", [round(float(m.norm()), 2) for m in means], "avg norm", round(float(avg.norm()), 2),
      flush=True)
tr.es.mean = avg.to(tr.es.mean.dtype)
row = tr.validate()
row["averaged_generations"] = gens
(ROOT / "runs").mkdir(exist_ok=True)
out = ROOT / "runs" / f"avg-{Path(run).name}.json"
out.write_text(json.dumps(row))
print({k: v for k, v in row.items() if not isinstance(v, list)})
from namm_transfer.reporting.bootstrap import paired_difference_ci
last = [v for v in info["validation"] if v["generation"] == gens[-1] and isinstance(v.get("namm_scores"), list)][-1]
print("average - mean of generation %d: %+.3f [%+.3f, %+.3f] (paired by prompt)"
      % (gens[-1], *paired_difference_ci(row["namm_scores"], last["namm_scores"])))
