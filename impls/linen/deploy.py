"""Deployment, Flax Linen edition: batch norm folded into the layer before it, and the inference
program exported (jax.export). Mirror: impls/flax/deploy.py (NNX).

The folding and the program are JAX's, whichever Flax API holds the model: `fold`, `write_program`,
`load_program` and `program_operations` are the NNX edition's. What Linen changes is where the
layers' arrays are: in the variables beside the module, eps in the module's field.
"""

from common.init import BATCH_NORM_AFTER, LAYERS
from impls.flax.deploy import (BATCH_NORM_OPERATIONS, BATCH_STATISTICS_OPERATIONS, PROGRAM,  # noqa: F401 (shared)
                               PROGRAM_SUFFIX, fold, load_program, program_operations, write_program)
from impls.linen.lenet import BATCH_NORM_FIELDS, FOLDED, Model


def check_inference(model):
    """Refuse a model in training mode: what jax.export captures is one function, of one mode."""
    if model.training:
        raise ValueError("the model is in training mode, whose batch norm normalises with each batch's "
                         "statistics and updates the moving ones: call model.eval() before folding or exporting")


def fold_batch_norm(model):
    """A LeNet for inference computing what `model` (in inference mode) computes, each batch-norm
    layer folded into the convolution or Linear layer before it: no batch norm left."""
    check_inference(model)
    params, folded = model.variables["params"], {}
    for layer, kind, _ in LAYERS:
        if kind == "batch_norm":
            continue
        kernel, bias, norm_layer = params[layer]["kernel"], params[layer]["bias"], BATCH_NORM_AFTER.get(layer)
        if norm_layer:
            kernel, bias = fold(kernel, bias, *statistics(model, norm_layer))
        folded[layer] = {"kernel": kernel, "bias": bias}
    return Model(model.module.clone(norm=FOLDED), {"params": folded, "batch_stats": {}}, training=False)


def statistics(model, norm_layer):
    """(scale, offset, mean, var, eps) of the model's batch-norm layer `norm_layer`, as its inference
    uses them: the arrays from the variables, eps from the module, whose layers all take its own."""
    fields = BATCH_NORM_FIELDS[model.norm]
    return (*(model.variables[collection][norm_layer][name]
              for collection, name in (fields[field] for field in ("gamma", "beta", "moving_mean", "moving_var"))),
            model.module.eps)


def export_program(model, path, example):
    """`model`'s inference as a jax.export program with a symbolic batch dimension, serialized at
    `path`, whole or not at all. example: a batch (NHWC) of its dtype. Returns the path."""
    check_inference(model)
    module, variables = model.module, model.variables

    def predict(images):
        return module.apply(variables, images, train=False)
    return write_program(predict, path, example)
