"""Method `ecc`: train under the cost constraint with ADMM (`methods.admm`), then a hard projection of the
trained weights in the Z-steps' metric; the ADMM epochs come out of the common training budget."""

from __future__ import annotations

from onnxecc.methods.base import Context, Method, Selection
from onnxecc.train import distributed


class Ecc(Method):
    name = "ecc"
    needs_data = True
    phase = "admm"

    def select(self, problem, target, ctx: Context) -> Selection:
        from onnxecc.methods.admm import AdmmConfig, admm  # torch

        opts, mm = ctx.opts, ctx.mm
        config = AdmmConfig(opts.admm_iterations, opts.admm_epochs, opts.rho, opts.rho_growth, opts.admm_decay,
                            verify=opts.verify_projection, importance="fisher" if ctx.fisher else "l2",
                            w_step=opts.admm_w_step)
        log = admm(problem, mm, target, config, ctx.emit)
        names = problem.producer_tensors()
        # hard projection of the trained W, in the Z-steps' metric
        keep = distributed.on_main(lambda: problem.project(
            target, mm.onnx_values(names), fisher=mm.fisher(names) if ctx.fisher else None)[0])
        return Selection(keep, [{"phase": "admm", **e} for e in log],
                         epochs_spent=opts.admm_iterations * opts.admm_epochs)
