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
"""

from __future__ import annotations

from absl import flags

import jaxprune
from experiments import _cnn_common as cc
from experiments import _cnn_finetune as ft
from experiments import _common
from jaxprune import pruners

FLAGS = flags.FLAGS
STUDY = "percentile_vs_distinctiveness"

def define_flags() -> None:
  """Defines this binary's flags (only when run as a program, so tests can import it)."""
  ft.define_flags()
  flags.DEFINE_list("angles", ["45", "50"], "Similarity thresholds in degrees (filters closer than "
                    "this are merged).")
  flags.DEFINE_list("groups", [], "Unit groups (conv layers) to prune; default every conv group "
                    "(LeNet conv_0, conv_1; ResNet-18 the first conv of every block).")


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


def main(argv):
  _common.check_no_args(argv)
  s = ft.settings()
  angles = list(_common.parse_list("angles", FLAGS.angles, float, low=0.0, high=180.0,
                                   unique=False))
  s["angles"] = angles
  s["groups"] = list(FLAGS.groups)
  setup = ft.prepare(s)
  model = setup.model
  groups = list(FLAGS.groups) or cc.conv_groups(model)
  unknown = [g for g in groups if g not in model.groups or model.groups[g].kind != "conv"]
  if unknown:
    _common.fail(f"--groups {unknown} are not conv unit groups of {type(model).__name__}; "
                 f"choose from {cc.conv_groups(model)}.")
  study = _common.Study(STUDY, s)
  steps = 2 + 2 * len(angles)
  prog = _common.Progress(steps, STUDY)

  tuned, tuned_rec = ft.finetune(study, setup)
  prog.step("fine-tuned")
  base_acc = tuned_rec["test_accuracy"][-1]
  retrain = dict(epochs=s["retrain_epochs"], learning_rate=s["learning_rate"],
                 batch_size=s["batch_size"])

  def unpruned():
    _, rec = cc.train(model, tuned, setup.split, key=_common.config_key(s["seed"], "retrain"),
                      desc="unpruned", **retrain)
    return rec

  unpruned_rec = study.cached("unpruned", unpruned)
  prog.step("unpruned network retrained")

  per_angle, frac_rows, acc_rows = {}, [], []
  for angle in angles:
    def distinct(angle=angle):
      params, umasks, wmasks = distinctiveness_prune(model, tuned, groups, angle)
      _, rec = cc.train(model, params, setup.split, masks=wmasks,
                        key=_common.config_key(s["seed"], "retrain"), desc=f"distinct {angle:g}",
                        **retrain)
      return {**rec, "layers": layer_fractions(model, umasks),
              "weights_kept": jaxprune.count_weights(wmasks)}

    drec = study.cached(f"distinctiveness_{angle:g}", distinct)
    prog.step(f"distinctiveness {angle:g} deg retrained")
    fmax = max(v["fraction_pruned"] for v in drec["layers"].values())

    def magnitude(fmax=fmax):
      params, wmasks = magnitude_masks(model, tuned, groups, fmax)
      _, rec = cc.train(model, params, setup.split, masks=wmasks,
                        key=_common.config_key(s["seed"], "retrain"), desc=f"magnitude {fmax:.3f}",
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
                       "acc_best": max(rec["test_accuracy"][1:])})
    cc.plot_curves(
        study.path(f"retrain_{angle:g}deg.png"),
        f"Retraining after pruning {100 * fmax:.1f}% (distinctiveness < {angle:g} deg)",
        {f"distinctiveness < {angle:g} deg": drec["test_accuracy"],
         f"magnitude percentile {100 * fmax:.1f}% per layer": mrec["test_accuracy"],
         "unpruned": unpruned_rec["test_accuracy"]},
        ylabel="test accuracy (fraction)", xlabel="retraining epoch (0 = just pruned)",
        hline=("fine-tuned, unpruned", base_acc))

  study.write_results({"finetune": tuned_rec, "unpruned": unpruned_rec, "angles": per_angle,
                       "groups": groups, "description": setup.description})
  t1 = _common.write_table(study.dir, "layer_fractions", frac_rows,
                           ["angle_deg", "layer", "units", "kept", "fraction_pruned"])
  t2 = _common.write_table(study.dir, "accuracy", acc_rows,
                           ["angle_deg", "fraction", "method", "acc_after_pruning", "acc_final",
                            "acc_best"])
  figs = "\n\n".join(f"![](retrain_{a:g}deg.png)" for a in angles)
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
      ("Test accuracy (retrained " + f"{s['retrain_epochs']} epochs)", t2),
      ("Figures", figs),
  ])
  print(f"Wrote {study.dir}/REPORT.md")


if __name__ == "__main__":
  define_flags()
  _common.run_binary(main)
