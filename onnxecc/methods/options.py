"""The options of a compression run (`CompressOptions`): every knob of `onnxecc compress`, read by the verbs and by
the methods alike, so it lives below both (a method never imports the verb that runs it). `core.recipe` reads and
writes it as a recipe file.
"""

from __future__ import annotations

from dataclasses import dataclass

METRICS = ("macs", "params", "latency", "energy")


@dataclass
class CompressOptions:
    """Every knob of `compress`, with defaults that work on the demo models without tuning."""

    metric: str = "macs"
    method: str = "auto"  # auto: ecc with --data, else project (see `compress._auto_method`)
    profile: str | None = None  # fitted latency/energy profile JSON (`onnxecc profile`), for those metrics
    hardware: str | None = None  # accelerator description JSON, for --method wsp
    data: str | None = None
    epochs: int = 30
    lr: float | None = None  # None (--lr auto): the final fine-tuning's rate by a probe (`compress._finetune_lr`)
    batch_size: int = 64
    seed: int = 0
    round_to: int | None = None  # None: the profile's width step, else the CPU kernels' channel block (8/16)
    min_width: int = 1
    temperature: float = 2.0
    distill_weight: float = 0.5
    device: str = "auto"
    measure_latency: bool = True
    proj_interval: int = 10  # --method wsp: batches between weighted sparse projections
    admm_iterations: int = 5
    admm_epochs: int = 2  # epochs per ADMM iteration (W-step)
    # ECC's initial ADMM ρ per Adam step; None (--rho auto): the pull per W-step that was chosen with admm_decay 4
    # on a validation split of the training data (bench `tune`), whatever the W-step's length (`admm.reference_rho`)
    rho: float | None = None
    rho_growth: float = 2.0
    admm_decay: int = 4  # ADMM iterations over which the budget decays from the original cost to the target
    admm_w_step: str = "prox"  # ECC W-step: prox (exact proximal step after each Adam step) | penalty (in the loss)
    provider: str = "CPUExecutionProvider"  # where latency is measured (closed loop, report)
    threads: int = 1
    closed_loop: bool = True  # measured metrics: re-measure the output; tighten if it misses, loosen if far under
    closed_loop_loosen: bool | None = None  # loosen when >10% under: None = only when rounds do not train
    verify_projection: bool = False  # debug: check every ADMM Z-step against the exact MILP (small models)
    importance: str = "auto"  # channel importance for project/ecc: fisher (needs --data) | l2; auto: fisher with data
    # with --data, prune the approximate groups too (a normalisation runs over them); False leaves them whole: on the
    # bench's text transformer at MACs 0.3 (validation split, seed 0) pruning its residual width cost 4.9 (project)
    # and 5.8 (ecc) points of accuracy; on its digits ViT 0 and 1.7 (issue 25)
    prune_approximate: bool = True
    max_rounds: int | None = None  # closed-loop rounds; None: 6 when a round only projects (seconds), else 3
    knobs: tuple[str, ...] = ("width",)  # + "precision": int8 QDQ layers chosen by measurement (onnxecc.cost.quantize)
    qat: bool = True  # with precision: final fine-tuning with the int8 layers fake-quantized (train.qat.FakeQuant)
    recalibrate: bool = True  # before fine-tuning: conv outputs' mean and spread back to the original's
    # sizes of symbolic input dims to analyse at (`inputs.parse_input_shapes` of --input-shape; None: the first
    # sample of --data); `compress` puts the sizes it resolved here (`inputs.resolve_shapes`, batch first);
    # key None: the model's only input (`--input-shape 1,3,64,64`). The annotations type recipe files (`recipe`)
    input_shapes: dict[str | None, tuple[int, ...]] | None = None
    # the output axis of class scores (`outputs.output_kind`); None: detected, which cannot tell N×T×C logits per
    # step from a map
    class_axis: int | None = None
