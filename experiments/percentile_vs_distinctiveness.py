"""Weight-based distinctiveness on conv filters versus layerwise magnitude percentile (Dixit).

A CNN is fine-tuned on the images (ResNet-18 from ``--pretrained``, else a smaller CNN trained
from scratch). For each angle (45 and 50 degrees by default) weight-based distinctiveness merges
conv filters (incoming weights flattened to in_ch x k x k) whose angle is below the threshold
(similar-only; the removed filter's outgoing weights are added to the kept one's), layer by
layer in network order, sweeping each layer until no pair qualifies. The fraction of filters
pruned per layer is reported; layerwise magnitude percentile then prunes the largest of those
fractions of the weights of every pruned layer's kernel. Both are retrained with their masks for
``--retrain_epochs`` and compared, epoch by epoch on the test split, with the unpruned network
retrained the same way.

  python -m experiments.percentile_vs_distinctiveness --workdir=/tmp/work
  python -m experiments.percentile_vs_distinctiveness --quick --workdir=/tmp/work   # the smoke run

From Python: ``pvd.run(pvd.Config.quick(), "/tmp/work")`` after
``from experiments import percentile_vs_distinctiveness as pvd``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import jaxprune
from experiments import _cnn_common as cc
from experiments import _cnn_finetune as ft
from experiments import _flags
from experiments import _report
from experiments import _store
from jaxprune import pruners

STUDY = "percentile_vs_distinctiveness"


@dataclasses.dataclass(frozen=True)
class Config(ft.Config):
  """Every setting of the study: the fine-tuned network's (``_cnn_finetune.Config``), the angles
  and the pruned groups; each field is also a flag (``_flags.define_flags``)."""
  angles: tuple = _flags.field((45.0, 50.0), "Similarity thresholds in degrees (filters closer "
                               "than this are merged).", low=0.0, high=180.0)
  groups: tuple = _flags.field((), "Unit groups (conv layers) to prune; default every conv group "
                               "(LeNet conv_0, conv_1; ResNet-18 the first conv of every block).",
                               kind=str, nonempty=False)


def distinctiveness_prune(model, params, groups, angle):
  """Similar-only weight distinctiveness on each group's filters until no pair is below ``angle``.

  Returns ``(params, unit_masks, weight_masks)``; the params have the removed filters' outgoing
  weights added to the kept ones' and every removed slice zeroed.
  """
  umasks = {g: jaxprune.unit_masks_ones(model)[g] for g in groups}
  for g in groups:
    prune = pruners.weight_distinctiveness(model, g, source="incoming", similar=True,
                                           complementary=False, constants=False)
    params, umasks, _ = pruners.until_stable(prune, params, umasks, angle, 180.0)
  return params, umasks, jaxprune.expand(params, model, umasks)


def min_angles(model, params, groups) -> dict[str, float]:
  """The smallest angle (degrees) between two filters' kernels (flattened incoming weights) of
  each group: below it, weight distinctiveness merges nothing in that layer."""
  out = {}
  for g in groups:
    (path,) = cc.producer_kernel_paths(model, params, [g])[:1]
    kernel = np.asarray(jaxprune.units.get_path(params, path))
    vectors = kernel.reshape(-1, kernel.shape[-1]).T
    ang = np.asarray(pruners.pairwise_angles(vectors), np.float64)
    ang[np.diag_indices_from(ang)] = np.inf
    out[g] = float(np.nanmin(ang))
  return out


def overall_fraction(layers: dict) -> float:
  """Filters removed over all pruned layers, as a fraction of their filters."""
  units = sum(v["units"] for v in layers.values())
  return sum(v["units"] - v["kept"] for v in layers.values()) / max(units, 1)


def find_angle(model, params, groups, start: float, low=0.2) -> dict:
  """The first whole angle above ``start`` whose sweeps remove at least ``low`` of the filters
  (coarse 5-degree steps, then 1-degree steps back); None when not even 179 degrees does."""
  def frac(a):
    _, um, _ = distinctiveness_prune(model, params, groups, float(a))
    return overall_fraction(layer_fractions(model, um))
  tried = {}
  coarse = [a for a in range(int(np.floor(start)) + 5, 180, 5)] + [179]
  prev = int(np.floor(start))
  for a in coarse:
    tried[a] = frac(a)
    if tried[a] >= low:
      for b in range(prev + 1, a):
        tried[b] = frac(b)
        if tried[b] >= low:
          return {"angle": float(b), "fraction": tried[b], "tried": tried}
      return {"angle": float(a), "fraction": tried[a], "tried": tried}
    prev = a
  return {"angle": None, "fraction": None, "tried": tried}


def layer_fractions(model, umasks) -> dict[str, dict]:
  out = {}
  for g, m in umasks.items():
    size = model.groups[g].size
    kept = int(m.sum())
    out[g] = {"units": size, "kept": kept, "fraction_pruned": (size - kept) / size}
  return out


def magnitude_masks(model, params, groups, fraction):
  paths = cc.producer_kernel_paths(model, params, groups)
  return pruners.magnitude_prune(params, None, fraction, scope="layer", select=paths)


def _groups(config: Config, model) -> list[str]:
  """The conv groups to prune (``--groups``, or all of them); a one-line error for others."""
  groups = list(config.groups) or cc.conv_groups(model)
  unknown = [g for g in groups if g not in model.groups or model.groups[g].kind != "conv"]
  if unknown:
    _flags.fail(f"--groups {unknown} are not conv unit groups of {type(model).__name__}; "
                f"choose from {cc.conv_groups(model)}.")
  return groups


def run(config: Config, workdir: str = "workdir", *, data: str = "images",
        data_path: str | None = None) -> dict:
  """Runs (or resumes) the study; returns the results written to results.json."""
  angles = list(config.angles)
  setup, study = ft.start(config, STUDY, workdir, data, data_path,
                          check=lambda s: _groups(config, s.model))
  c = setup.config  # resolved: arch, image size and channels concrete
  model = setup.model
  groups = _groups(config, model)
  steps = 2 + 2 * len(angles)
  prog = _report.Progress(steps, STUDY)

  tuned, tuned_rec = ft.finetune(study, setup)
  prog.step("fine-tuned")
  base_acc = tuned_rec["test_accuracy"][-1]
  retrain = dict(epochs=c.retrain_epochs, learning_rate=c.learning_rate,
                 batch_size=c.batch_size)

  def unpruned():
    _, rec = cc.train(model, tuned, setup.split, key=_store.config_key(c.seed, "retrain"),
                      desc="unpruned", **retrain)
    return rec

  unpruned_rec = study.cached("unpruned", unpruned)
  prog.step("unpruned network retrained")

  mins = study.cached("min_angles", lambda: min_angles(model, tuned, groups))
  search = None
  first = min(angles)
  _, um_first, _ = distinctiveness_prune(model, tuned, groups, first)
  if overall_fraction(layer_fractions(model, um_first)) == 0.0:
    # Nothing to prune at the smallest angle: find where pruning starts to bite (20-50%).
    search = study.cached("angle_search", lambda: find_angle(model, tuned, groups, first))
    if search["angle"] is not None and search["angle"] not in angles:
      angles.append(search["angle"])
      prog.total += 2

  per_angle, frac_rows, acc_rows = {}, [], []
  for angle in angles:
    def distinct(angle=angle):
      params, umasks, wmasks = distinctiveness_prune(model, tuned, groups, angle)
      if overall_fraction(layer_fractions(model, umasks)) == 0.0:
        # Nothing merged: the params are the fine-tuned ones and every mask keeps everything, so
        # retraining would repeat the unpruned run exactly (same key): reuse its curve.
        return {**unpruned_rec, "layers": layer_fractions(model, umasks),
                "weights_kept": jaxprune.count_weights(wmasks)}
      _, rec = cc.train(model, params, setup.split, masks=wmasks,
                        key=_store.config_key(c.seed, "retrain"), desc=f"distinct {angle:g}",
                        **retrain)
      return {**rec, "layers": layer_fractions(model, umasks),
              "weights_kept": jaxprune.count_weights(wmasks)}

    drec = study.cached(f"distinctiveness_{angle:g}", distinct)
    prog.step(f"distinctiveness {angle:g} deg retrained")
    fmax = max(v["fraction_pruned"] for v in drec["layers"].values())

    def magnitude(fmax=fmax):
      params, wmasks, _ = magnitude_masks(model, tuned, groups, fmax)
      if fmax == 0.0:  # as above: nothing pruned, the unpruned run's curve
        return {**unpruned_rec, "weights_kept": jaxprune.count_weights(wmasks)}
      _, rec = cc.train(model, params, setup.split, masks=wmasks,
                        key=_store.config_key(c.seed, "retrain"), desc=f"magnitude {fmax:.3f}",
                        **retrain)
      return {**rec, "weights_kept": jaxprune.count_weights(wmasks)}

    mrec = study.cached(f"magnitude_{fmax:.6f}", magnitude)
    prog.step(f"magnitude {fmax:.3f} retrained")
    per_angle[f"{angle:g}"] = {"fraction": fmax, "distinctiveness": drec, "magnitude": mrec}
    for g, v in drec["layers"].items():
      frac_rows.append({"angle_deg": angle, "layer": g, **v})
    for name, rec in (("distinctiveness", drec), ("magnitude", mrec), ("unpruned", unpruned_rec)):
      acc_rows.append({"angle_deg": angle, "fraction": fmax, "method": name,
                       "acc_after_pruning": rec["test_accuracy"][0],
                       "acc_final": rec["test_accuracy"][-1],
                       "acc_best_on_test": max(rec["test_accuracy"][1:])})
    cc.plot_curves(
        study.path(f"retrain_{angle:g}deg.png"),
        f"Retraining after pruning {100 * fmax:.1f}% (distinctiveness < {angle:g} deg)",
        {f"distinctiveness < {angle:g} deg": drec["test_accuracy"],
         f"magnitude percentile {100 * fmax:.1f}% per layer": mrec["test_accuracy"],
         "unpruned": unpruned_rec["test_accuracy"]},
        ylabel="test accuracy (fraction)", xlabel="retraining epoch (0 = just pruned)",
        hline=("fine-tuned, unpruned", base_acc))

  results = {"finetune": tuned_rec, "unpruned": unpruned_rec, "angles": per_angle,
             "groups": groups, "description": setup.description, "min_angles": mins,
             "angle_search": search,
             # The report's tables, as rows (what `experiments.report_docs` puts in the docs).
             "summary": {"accuracy": acc_rows, "layer_fractions": frac_rows,
                         "min_angles": [{"layer": g, "filters": model.groups[g].size,
                                         "min_angle_deg": v} for g, v in mins.items()]}}
  study.write_results(results)
  t1 = _report.write_table(study.dir, "layer_fractions", frac_rows,
                           ["angle_deg", "layer", "units", "kept", "fraction_pruned"])
  t2 = _report.write_table(study.dir, "accuracy", acc_rows,
                           ["angle_deg", "fraction", "method", "acc_after_pruning", "acc_final",
                            "acc_best_on_test"])
  figs = "\n\n".join(f"![](retrain_{a:g}deg.png)" for a in angles)
  t_min = _report.markdown_table([{"layer": g, "filters": model.groups[g].size,
                                   "min_angle_deg": round(v, 2)} for g, v in mins.items()])
  if search is not None:
    if search["angle"] is None:
      t1 += (f"\nAt {first:g} degrees weight-based distinctiveness finds nothing, and no angle "
             "below 180 removes 20% of the filters.\n")
    else:
      t1 += (f"\nAt {first:g} degrees weight-based distinctiveness finds nothing on this "
             f"network: the smallest angle between two filters of a layer is above it (table "
             f"below). The study therefore also runs at {search['angle']:g} degrees, the first "
             f"whole angle that removes at least 20% of the filters "
             f"({100 * search['fraction']:.1f}% overall"
             + ("; more than 50%: no whole angle lands in 20-50%" if search["fraction"] > 0.5
                else "") + ").\n")
  idle = [f"{float(a):g}" for a, rec in per_angle.items() if rec["fraction"] == 0]
  if idle:
    t1 += (f"\nAt {' and '.join(idle)} degrees no two filters of a layer were closer than the "
           "angle, so distinctiveness pruned nothing and magnitude pruning was run at the same "
           "(zero) fraction: all three curves are the unpruned network. Larger angles "
           "(`--angles=85`, say) make filters merge on this network.\n")
  study.write_report("Percentile versus distinctiveness with retraining", [
      ("Set-up", setup.description + f" Fine-tuned test accuracy: {base_acc:.4f}. Pruned "
       f"groups: {', '.join(groups)}. Distinctiveness: similar-only on incoming filter weights "
       "(in_ch x k x k), layers in network order, repeated sweeps until no pair is below the "
       "angle. Magnitude: the largest per-layer distinctiveness fraction, per layer, on the "
       "same layers' kernels (unstructured)."),
      ("Fraction of filters pruned per layer", t1),
      ("Smallest angle between two filters, per layer", t_min),
      ("Test accuracy (retrained " + f"{c.retrain_epochs} epochs)",
       t2 + "\n" + _report.BEST_ON_TEST_NOTE + "\n"),
      ("Figures", figs),
  ])
  print(f"Wrote {study.dir}/REPORT.md")
  return results


def main(argv):
  _flags.run_main(argv, Config, run)


if __name__ == "__main__":
  _flags.define_flags(Config, default_data="images")
  _flags.run_binary(main)
