"""Deployment, PyTorch edition: batch norm folded into the layer before it, and the inference
program exported (torch.export; ONNX through torch.onnx). Mirror: impls/flax/deploy.py.

In inference, batch norm is an affine map per channel, y = gamma * (x - mean) / sqrt(var + eps) +
beta, with the moving statistics as stored: it folds into the convolution or Linear layer before it,
W' = W * s and b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), per output channel. What
inference uses is what folds: the layer's own eps, torch-builtin's unbiased running variance as it
is. A model in training mode normalises with its batch's statistics instead, which fold into
nothing: every function here refuses one.
"""

import copy
import re
from collections import Counter

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights, fuse_linear_bn_eval, fuse_linear_bn_weights

from common.files import atomic_path
from common.init import BATCH_NORM_AFTER, LAYERS
from impls.pytorch.lenet import FOLDED, LeNet

PROGRAM = "torch.export"
PROGRAM_SUFFIX = ".pt2"
# What batch norm leaves in an exported program (its ATen operations, decomposed): nn.BatchNorm in
# inference, the scratch layer's square root.
BATCH_NORM_OPERATIONS = frozenset({"_native_batch_norm_legit_no_training", "sqrt", "rsqrt"})
# What batch statistics leave: nn.BatchNorm in training, the scratch layer's sums over the batch.
BATCH_STATISTICS_OPERATIONS = frozenset({"_native_batch_norm_legit_functional", "_native_batch_norm_legit",
                                         "native_batch_norm", "sum", "mean", "var", "var_mean"})
ATEN_OPERATION = re.compile(r"^aten\.(\w+)\.")
# The batch dimension of LeNet.forward's images, left free: a program for any batch size.
DYNAMIC_BATCH = {"X": {0: torch.export.Dim("batch", min=1)}}


def check_inference(model):
    """Refuse a model in training mode: torch.export records the mode at capture, and one program
    per mode is what it makes (pytorch/pytorch#151726)."""
    if model.training:
        raise ValueError("the model is in training mode, whose batch norm normalises with each batch's "
                         "statistics and updates the moving ones: call model.eval() before folding or exporting")


def fold_batch_norm(model):
    """A LeNet for inference computing what `model` (in inference mode) computes, each batch-norm
    layer folded into the convolution or Linear layer before it: no batch norm left."""
    check_inference(model)
    weight = model.conv1.weight
    folded = LeNet(FOLDED, dtype=weight.dtype, autocast_dtype=model.autocast_dtype).to(weight.device)
    for layer, kind, _ in LAYERS:
        if kind == "batch_norm":
            continue
        before, norm_layer = getattr(model, layer), BATCH_NORM_AFTER.get(layer)
        setattr(folded, layer, folded_layer(before, getattr(model, norm_layer)) if norm_layer else
                copy.deepcopy(before))
    return folded.eval()


def folded_layer(layer, batch_norm):
    """The convolution or Linear `layer` with `batch_norm` folded in. nn.BatchNorm through PyTorch's
    own fusers; the chapter's layer, which they do not know, through the formula they use, on its
    tensors."""
    convolution = isinstance(layer, nn.Conv2d)
    if isinstance(batch_norm, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return (fuse_conv_bn_eval if convolution else fuse_linear_bn_eval)(layer, batch_norm)
    fuse = fuse_conv_bn_weights if convolution else fuse_linear_bn_weights
    folded = copy.deepcopy(layer)
    folded.weight, folded.bias = fuse(layer.weight, layer.bias, batch_norm.moving_mean, batch_norm.moving_var,
                                      batch_norm.eps, batch_norm.gamma, batch_norm.beta)
    return folded


def export_program(model, path, example):
    """`model`'s inference as a torch.export program with a dynamic batch dimension, saved at `path`
    (torch.export.save), whole or not at all. example: a numpy batch (NCHW) of its dtype, of 2 or
    more (a batch of 1 would fix the dimension). Returns the path."""
    check_inference(model)
    with torch.no_grad():
        program = torch.export.export(model, (example_input(model, example),), dynamic_shapes=DYNAMIC_BATCH)
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        torch.export.save(program, file)
    return str(path)


def load_program(path, device):
    """The saved program, back, on `device`, as a function of a numpy batch (NCHW) to numpy logits."""
    module = torch.export.load(path).module().to(device)

    def predict(images):
        with torch.no_grad():
            return module(torch.from_numpy(images).to(device)).cpu().numpy()
    return predict


def program_operations(path):
    """{ATen operation: count} of the saved program, decomposed as a runtime runs it (LeNet's
    forward pass nests its operations under autocast's, which decomposition inlines)."""
    program = torch.export.load(path).run_decompositions()
    names = (ATEN_OPERATION.match(str(node.target)) for node in program.graph.nodes if node.op == "call_function")
    return Counter(match.group(1) for match in names if match)


def export_onnx(model, path, example):
    """`model`'s inference as an ONNX file (torch.onnx.export through torch.export, dynamo=True) with
    a dynamic batch dimension: input 'images' (NCHW), output 'logits'; one file, written whole or not
    at all. Returns the path."""
    check_inference(model)
    with atomic_path(path) as temporary:
        # verbose=False: without it the exporter prints its progress; external_data=False: the
        # weights inside the file, not in a second one beside it.
        torch.onnx.export(model, (example_input(model, example),), temporary, dynamo=True,
                          dynamic_shapes=DYNAMIC_BATCH, input_names=["images"], output_names=["logits"],
                          verbose=False, external_data=False)
    return str(path)


def example_input(model, example):
    """The numpy example batch as the model takes it: a tensor on its device."""
    return torch.from_numpy(example).to(next(model.parameters()).device)
