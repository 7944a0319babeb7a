"""report.html: the mirrored source side by side, the README's tables of differences linked to it,
and a run's results, in one self-contained page (styles inline, plots as inline SVG, no scripts,
nothing fetched).

The source view pairs definitions, not lines. `ast` finds each file's definitions (functions,
classes and their methods, module-level assignments); difflib aligns twin files definition by
definition (matched by name, in file order) and, inside each pair, marks the lines and the
words that differ; Pygments highlights; Jinja2 lays out the page (templates/report.html.j2).
The tables of differences are README.md's, read with markdown-it-py at every build: the README is
their single source of truth, and PLACES below says where in the source each row is implemented.
"""

import ast
import difflib
import os
import re
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path

import jinja2
from markdown_it import MarkdownIt
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import PythonLexer

from common.files import write_text
from common.report.bounds import float32_bounds
from impls import registry

ROOT = Path(__file__).resolve().parents[2]  # the repository: README.md and impls/
PAGE = "report.html"
TEMPLATES = Path(__file__).resolve().parent / "templates"
HEAD = "(docstring and imports)"  # what the page calls a file's head


@dataclass(frozen=True)
class Framework:
    title: str                      # its name on the page
    read_against: str | None = None  # the framework it is shown beside (README: PyTorch | NNX, NNX | Linen)


# Which framework each is read against, by its folder under impls/ (impls.registry.FRAMEWORKS):
# PyTorch beside NNX, NNX beside Linen. A framework not named here is shown beside the one
# registered before it.
READ_AGAINST = {"flax": "pytorch", "linen": "flax"}
# The order in which to read the mirrored files; any other file comes after these, by name.
FILE_ORDER = ("batch_norm.py", "lenet.py", "train.py", "data_parallel.py", "checkpoint.py", "deploy.py")

# Twins whose names differ by the frameworks' conventions: (file, {framework: definition}, why).
TWINS_BY_OTHER_NAME = [
    ("batch_norm.py", {"pytorch": "BatchNorm.forward", "flax": "BatchNorm.__call__"},
     "a PyTorch module computes in forward (its __call__ runs hooks around it); a Flax module is called"),
    ("lenet.py", {"pytorch": "LeNet.forward", "flax": "LeNet.__call__", "linen": "LeNet.__call__"},
     "a PyTorch module computes in forward (its __call__ runs hooks around it); a Flax module is called"),
    ("lenet.py", {"flax": "LeNet.__init__", "linen": "LeNet.setup"},
     "a Linen module is a dataclass: its fields are its arguments, and setup makes its submodules"),
    ("lenet.py", {"pytorch": "state_dict_key", "flax": "model_variable", "linen": "variable_path"},
     "where each framework keeps a canonical weight: a key of the state_dict, a variable of the NNX "
     "model, a path into Linen's collections"),
    ("deploy.py", {"pytorch": "folded_layer", "flax": "fold"},
     "PyTorch folds a layer through its own fusers, which take the modules (or their tensors); JAX folds "
     "the arrays, with the formula written once for NNX and Linen"),
    ("deploy.py", {"pytorch": "ATEN_OPERATION", "flax": "STABLEHLO_OPERATION"},
     "a program's operations as each runtime names them: ATen's, StableHLO's"),
]

# Definitions that have no twin in the framework they are shown beside, by design: ((framework,
# framework it is read against), file) -> {framework: [definitions]}. The page shows each with its
# docstring or comment, which says why; any other definition without a twin is a twin that was
# renamed or removed on one side only, and the page and the tests say so.
WITHOUT_TWIN = {
    (("pytorch", "flax"), "batch_norm.py"): {"flax": ["VARIANCE_NAMES", "reset_running_stats"]},
    (("flax", "linen"), "batch_norm.py"): {"flax": ["BatchNorm.__init__"]},
    (("pytorch", "flax"), "lenet.py"): {"flax": ["Folded", "promote_input_only", "to_flax_layout",
                                                 "from_flax_layout"]},
    (("flax", "linen"), "lenet.py"): {"flax": ["promote_input_only", "Folded.__init__"], "linen": ["Model"]},
    (("pytorch", "flax"), "train.py"): {
        "pytorch": ["cross_entropy", "loss_and_counts", "FastTrainer.step", "FastTrainer.capture",
                    "FastTrainer.train_with_graph"],
        "flax": ["loss_value_and_gradients", "sgd_step", "functional_train_step", "train_on_batches",
                 "train_on_batch", "FastTrainer.split"]},
    (("flax", "linen"), "train.py"): {
        "linen": ["TrainState", "Optimizer", "jitted_sgd_step", "state_for_step", "keep_state",
                  "logits_and_statistics", "jitted_loss_value_and_gradients"]},
    (("pytorch", "flax"), "checkpoint.py"): {
        "flax": ["checkpointer", "save_orbax", "is_orbax_folder", "orbax_tree_names", "read_orbax", "pure_dict"]},
    (("flax", "linen"), "checkpoint.py"): {"flax": ["checkpointer", "pure_dict"]},
    (("pytorch", "flax"), "deploy.py"): {
        "pytorch": ["DYNAMIC_BATCH", "export_onnx", "example_input"],
        "flax": ["PLATFORMS", "EPS_FIELD", "statistics", "write_program"]},
    (("flax", "linen"), "deploy.py"): {"flax": ["STABLEHLO_OPERATION", "PLATFORMS", "EPS_FIELD"]},
    (("pytorch", "flax"), "data_parallel.py"): {
        "flax": ["AXIS", "use_host_devices", "worker_value_and_gradients", "worker_train_step", "train_on_shards",
                 "MeshTrainer"]},
}
# Why, for those whose own docstring or comment does not say it.
WITHOUT_TWIN_REASONS = {
    ("pytorch", "deploy.py", "export_onnx"): "JAX has no ONNX exporter of its own (google/flax#834): docs/deploying.md "
                                             "says what jax2onnx does with this LeNet, and what a Flax user does "
                                             "instead",
    ("pytorch", "deploy.py", "example_input"): "torch.export traces the model with an example tensor on its device; "
                                               "jax.export takes the shape and dtype alone",
    ("flax", "deploy.py", "statistics"): "PyTorch's fusers read the batch-norm module itself",
    ("flax", "deploy.py", "write_program"): "the program made from a function of the images, for NNX's model and for "
                                            "Linen's module and variables alike",
    ("pytorch", "train.py", "FastTrainer.step"): "one compiled step on a batch gathered on the device; the CUDA "
                                                 "graph records it too",
    ("linen", "train.py", "logits_and_statistics"): "Linen's predict applies the module to its variables, and in "
                                                    "training gets the moving statistics back",
}

# Where the code implements, or works around, each row of the README's tables (DIFFERENCE_TABLES):
# the row's topic (its first cell, as written there) -> [(file, definition)] or [(file, definition,
# framework)] for a place in one framework only.
PLACES = {
    # Where the frameworks differ
    "momentum": [("batch_norm.py", "MOMENTUM"), ("lenet.py", "make_batch_norm")],
    "running variance": [("batch_norm.py", "batch_norm"), ("checkpoint.py", "RUNNING_VARIANCE")],
    "variance formula": [("batch_norm.py", "batch_norm"), ("lenet.py", "make_batch_norm")],
    "layout": [("batch_norm.py", "batch_norm"), ("batch_norm.py", "check_input"), ("lenet.py", "to_flax_layout"),
               ("lenet.py", "from_flax_layout"), ("train.py", "LAYOUT")],
    "flatten before the first Linear": [("lenet.py", "LeNet.__call__"), ("lenet.py", "to_flax_layout")],
    "default init": [("lenet.py", "LeNet.__init__"), ("lenet.py", "build_lenet")],
    "train / inference switch": [("batch_norm.py", "BatchNorm.__call__"), ("lenet.py", "LeNet.__call__"),
                                 ("lenet.py", "Model", "linen"), ("train.py", "bound_train_step")],
    "where moving stats live": [("batch_norm.py", "BatchNorm.__init__"), ("batch_norm.py", "BatchNorm.__call__"),
                                ("train.py", "sgd_step"), ("train.py", "keep_state")],
    "training without saying the stats may change": [("train.py", "loss_function", "linen"),
                                                     ("train.py", "logits_and_statistics")],
    "running statistics' dtype": [("lenet.py", "make_batch_norm"), ("lenet.py", "build_lenet")],
    "train-mode batch of one": [("batch_norm.py", "check_input"), ("lenet.py", "check_batch")],
    "a trained model on disk": [("checkpoint.py", "save_native"), ("checkpoint.py", "load_native"),
                                ("checkpoint.py", "RUNNING_VARIANCE")],
    "float32 on NVIDIA GPUs (Ampere and later)": [("train.py", "allow_tf32")],
    "mixed precision (bfloat16)": [("lenet.py", "LeNet.__init__"), ("lenet.py", "LeNet.__call__"),
                                   ("lenet.py", "make_batch_norm"), ("lenet.py", "promote_input_only", "flax"),
                                   ("batch_norm.py", "batch_norm")],
    # Over several workers
    "batch-norm statistics, as commonly spelled": [("data_parallel.py", "build_lenet")],
    "synchronised built-in": [("lenet.py", "make_batch_norm")],
    "on the CPU": [("data_parallel.py", "use_host_devices"), ("data_parallel.py", "start_workers")],
    "shards of unequal size": [("batch_norm.py", "batch_norm"), ("data_parallel.py", "MeshTrainer")],
    "the replicas' moving statistics": [("data_parallel.py", "DataParallelTrainer.__init__"),
                                        ("data_parallel.py", "DataParallelTrainer.finish")],
    "gradients": [("data_parallel.py", "worker_loss_and_counts")],
    "a rendezvous that cannot be reached": [("data_parallel.py", "start_workers")],
    # Batch-norm options across frameworks
    "`eps`": [("batch_norm.py", "EPS"), ("lenet.py", "make_batch_norm")],
    "`momentum`, its two conventions": [("batch_norm.py", "builtin_momentum"), ("lenet.py", "make_batch_norm")],
    "`momentum=None`": [("batch_norm.py", "cumulative_average_momentum")],
    "statistics frozen in training": [("batch_norm.py", "builtin_momentum")],
    "`affine=False`": [("lenet.py", "BATCH_NORM_FIELDS")],
    "initial scale and bias": [("batch_norm.py", "BatchNorm.__init__"),
                               ("batch_norm.py", "BatchNorm.__call__", "linen"), ("lenet.py", "build_lenet")],
    "`track_running_stats=False`": [("batch_norm.py", "batch_norm")],
    "`reset_running_stats()`": [("batch_norm.py", "reset_running_stats")],
    "`num_batches_tracked`": [("lenet.py", "build_lenet", "pytorch"), ("batch_norm.py", "cumulative_average_momentum")],
    "feature axis": [("batch_norm.py", "batch_norm"), ("batch_norm.py", "check_input")],
    "`use_fast_variance`": [("lenet.py", "make_batch_norm")],
    "`force_float32_reductions` (Linen)": [("lenet.py", "make_batch_norm", "linen")],
    "`promote_dtype` (NNX)": [("lenet.py", "promote_input_only", "flax"), ("lenet.py", "make_batch_norm", "flax")],
    "`mask=` (Flax)": [("batch_norm.py", "batch_norm", "flax"), ("data_parallel.py", "MeshTrainer")],
    "grouped statistics": [("batch_norm.py", "sum_over_workers"), ("lenet.py", "make_batch_norm")],
    "`jit` over a sharded batch, `shard_map`": [("data_parallel.py", "build_lenet"),
                                                ("data_parallel.py", "train_on_shards", "flax")],
    "DDP's `broadcast_buffers`": [("data_parallel.py", "DataParallelTrainer.__init__"),
                                  ("data_parallel.py", "DataParallelTrainer.finish")],
    # Batch-norm options across frameworks: deployment
    "folding into the layer before it": [("deploy.py", "fold_batch_norm"), ("deploy.py", "folded_layer", "pytorch"),
                                         ("deploy.py", "fold", "flax")],
    "eps in a fold or an export": [("batch_norm.py", "BatchNorm.__init__"), ("deploy.py", "folded_layer"),
                                   ("deploy.py", "statistics"), ("deploy.py", "EPS_FIELD")],
    "exporting a model in training mode": [("deploy.py", "check_inference")],
    "the exported batch dimension": [("deploy.py", "DYNAMIC_BATCH"), ("deploy.py", "write_program")],
    "ONNX": [("deploy.py", "export_onnx")],
}

# The README's tables that the page shows, by the heading above each.
DIFFERENCE_TABLES = ("Where the frameworks differ", "Over several workers", "Batch-norm options across frameworks")
# The column of a table that names the tests pinning each row (`test_name`, or
# `tests/file.py::test_name` for a test of another file than the table's first), and the folder they are in.
PINNED_BY = "pinned by"
TESTS = "tests"


# ---------------------------------------------------------------------------
# Reading the source: definitions
# ---------------------------------------------------------------------------


@dataclass
class Block:
    """A run of a file's lines that belongs to one definition (with the comments above it), or to
    a file's head (docstring, imports) or a class's head (its line, docstring, fields)."""
    name: str               # qualified: "BatchNorm.forward"; HEAD for the file's head, the class's name for its head
    kind: str               # "head", "function", "class", "assignment"
    start: int              # first and last line shown, 1-based
    end: int
    docstring: str | None = None
    members: list = field(default_factory=list)  # a class's methods, as Blocks
    bases: list = field(default_factory=list)    # a class's bases, as ast expressions
    whole_end: int | None = None  # a class's last line, methods included

    @property
    def whole(self):
        """The lines of the whole definition: a class's with its methods."""
        return range(self.start, (self.whole_end or self.end) + 1)


@dataclass
class Source:
    """One framework's file: its lines, highlighted, its definitions, and what it imports."""
    framework: str
    filename: str
    path: Path
    lines: list             # the text of each line
    html_lines: list        # each line highlighted, self-contained HTML
    head: Block
    blocks: list            # top-level definitions, in file order
    imported: dict          # name -> (module, (first line, last line) of the import)
    module_aliases: dict    # alias -> module, for `from impls.flax import train as flax_train`

    @property
    def module(self):
        return f"impls.{self.framework}.{self.filename[:-3]}"

    @property
    def relative_path(self):
        return f"impls/{self.framework}/{self.filename}"

    def block(self, name):
        for block in self.blocks:
            if block.name == name:
                return block
            for member in block.members:
                if member.name == name:
                    return member
        return None


def defined_names(node):
    """The names a top-level statement defines: a def's or class's name, an assignment's targets."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    names = []
    for target in targets:
        elements = target.elts if isinstance(target, ast.Tuple) else [target]
        names += [element.id for element in elements if isinstance(element, ast.Name)]
    return names


def first_line(node):
    return min([node.lineno, *(decorator.lineno for decorator in getattr(node, "decorator_list", []))])


def trimmed(lines, start, end):
    """(start, end) without the blank lines at either end."""
    while start < end and not lines[start - 1].strip():
        start += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return start, end


def split_into_blocks(lines, statements, anchors, head_start, end):
    """The head (from head_start to the last statement before the first anchor) and one range per
    anchor statement: from the line after the previous range to the anchor's last line, so that
    the comments above a definition go with it. Lines after the last anchor go with it too."""
    first = next((index for index, node in enumerate(statements) if anchors(node)), len(statements))
    head_end = statements[first - 1].end_lineno if first else head_start
    if first == len(statements):
        head_end = end
    ranges, previous = [], head_end
    for node in statements[first:]:
        if anchors(node):
            ranges.append([node, previous + 1, node.end_lineno])
        elif ranges:  # a statement that defines nothing goes with the definition before it
            ranges[-1][2] = node.end_lineno
        previous = node.end_lineno
    if ranges:
        ranges[-1][2] = max(ranges[-1][2], end)
    return (head_start, head_end), ranges


def read_source(framework, path):
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text, filename=str(path))
    html_lines = highlight(text, PythonLexer(stripnl=False), HtmlFormatter(nowrap=True)).split("\n")
    imported, aliases = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                # `from impls.flax import train as flax_train` names a module; otherwise a name.
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                imported[alias.asname or alias.name] = (node.module, (first_line(node), node.end_lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
    (head_start, head_end), ranges = split_into_blocks(lines, tree.body, defined_names, 1, len(lines))
    blocks, seen = [], set()
    for node, start, end in ranges:
        name = ", ".join(defined_names(node))
        while name in seen:  # a name defined twice: the second is another definition
            name += "'"
        seen.add(name)
        start, end = trimmed(lines, start, end)
        if isinstance(node, ast.ClassDef):
            blocks.append(read_class(lines, node, name, start, end))
        else:
            kind = "assignment" if isinstance(node, (ast.Assign, ast.AnnAssign)) else "function"
            blocks.append(Block(name, kind, start, end, docstring_of(node)))
    head = Block(HEAD, "head", *trimmed(lines, head_start, head_end), docstring=ast.get_docstring(tree))
    return Source(framework, path.name, path, lines, html_lines, head, blocks, imported, aliases)


def docstring_of(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return ast.get_docstring(node)
    return None


def read_class(lines, node, name, start, end):
    """A class: its head (the class line, docstring and fields) and its methods."""
    is_method = lambda statement: isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef))  # noqa: E731
    (_, head_end), ranges = split_into_blocks(lines, node.body, is_method, start, node.end_lineno)
    if not any(is_method(statement) for statement in node.body):
        head_end = end
    members = [Block(f"{name}.{method.name}", "function", *trimmed(lines, method_start, method_end),
                     docstring=docstring_of(method))
               for method, method_start, method_end in ranges]
    head_start, head_end = trimmed(lines, start, head_end)
    return Block(name, "class", head_start, head_end, docstring_of(node), members, node.bases, end)


def framework_order():
    """The registered frameworks (impls.registry.FRAMEWORKS), in order, each with its title and the
    framework it is read against."""
    names = list(registry.FRAMEWORKS)
    return {name: Framework(registry.FRAMEWORKS[name].title,
                            READ_AGAINST.get(name, names[index - 1] if index else None))
            for index, name in enumerate(names)}


def read_sources(root=ROOT):
    """{file name: {framework: Source}} for every .py file of every framework under root/impls."""
    sources = {}
    for framework in framework_order():
        folder = root / "impls" / framework
        for path in sorted(folder.glob("*.py")):
            if path.name != "__init__.py":
                sources.setdefault(path.name, {})[framework] = read_source(framework, path)
    ordered = [name for name in FILE_ORDER if name in sources] + sorted(set(sources) - set(FILE_ORDER))
    return {name: sources[name] for name in ordered}


# ---------------------------------------------------------------------------
# Pairing: twin files aligned definition by definition
# ---------------------------------------------------------------------------


@dataclass
class Side:
    source: Source
    block: Block | None = None  # the definition shown, or None
    how: str = "own"            # "own", "imported" (from the twin), "inherited" (from the twin's class), "none"
    lines: tuple | None = None  # for "imported": the import statement's lines; "inherited": the class line


@dataclass
class Row:
    """One definition beside its twin (or beside nothing)."""
    anchor: str
    left: Side
    right: Side
    status: str             # "twins", "renamed", "imported", "inherited", "alone", "unexpected"; "single" in a file of one framework
    depth: int = 0          # 1 for a class's method
    reason: str | None = None
    line_pairs: list = field(default_factory=list)  # [(kind, left line or None, right line or None)]


@dataclass
class PairView:
    """One mirrored file, in two frameworks, side by side."""
    filename: str
    left: Source
    right: Source
    left_title: str
    right_title: str
    rows: list

    @property
    def anchor(self):
        return f"{self.filename[:-3]}--{self.left.framework}--{self.right.framework}"

    @property
    def short_title(self):
        return self.left_title if self.left is self.right else f"{self.left_title} | {self.right_title}"


def renamings(filename, left, right):
    """{right's name: left's name} for the twins of this file whose names differ by convention,
    and {left's name: why}."""
    names, reasons = {}, {}
    for twins_file, twins, why in TWINS_BY_OTHER_NAME:
        if twins_file == filename and left in twins and right in twins and twins[left] != twins[right]:
            names[twins[right]] = twins[left]
            reasons[twins[left]] = why
    return names, reasons


def slug(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def align(left_blocks, right_blocks, right_to_left):
    """Pairs (left block or None, right block or None) in the order of both files: difflib's
    matching of the two lists of names (right's renamed to left's), twins in the same order."""
    left_names = [block.name for block in left_blocks]
    right_names = [right_to_left.get(block.name, block.name) for block in right_blocks]
    matcher = difflib.SequenceMatcher(None, left_names, right_names, autojunk=False)
    pairs = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pairs += list(zip(left_blocks[i1:i2], right_blocks[j1:j2]))
        else:
            pairs += [(block, None) for block in left_blocks[i1:i2]] + [(None, block) for block in right_blocks[j1:j2]]
    return pairs


def from_twin(source, twin, name):
    """The lines of `source`'s import of `name` from its twin's module, or None."""
    module, lines = source.imported.get(name.split(".")[0], (None, None))
    return lines if module == twin.module and "." not in name else None


def inherits_from_twin(source, twin, block):
    """The class line of `block`, a class of `source`, if one of its bases is its twin's class."""
    for base in block.bases:
        if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
            module, name = source.module_aliases.get(base.value.id), base.attr
        elif isinstance(base, ast.Name):
            module, name = source.imported.get(base.id, (None, None))[0], base.id
        else:
            continue
        if module == twin.module and twin.block(name) is not None:
            return (block.start, block.start)
    return None


def pair_view(filename, left, right, frameworks):
    right_to_left, reasons = renamings(filename, left.framework, right.framework)
    left_to_right = {value: key for key, value in right_to_left.items()}
    expected = WITHOUT_TWIN.get(((left.framework, right.framework), filename), {})
    view = PairView(filename, left, right, frameworks[left.framework].title, frameworks[right.framework].title, [])

    def twins(left_block, right_block, depth):
        status = "twins" if left_block.name == right_block.name else "renamed"
        row = Row(f"{view.anchor}--{slug(left_block.name)}", Side(left, left_block), Side(right, right_block), status,
                  depth, reasons.get(left_block.name))
        row.line_pairs = line_pairs(left, left_block, right, right_block)
        view.rows.append(row)

    def one_side(block, on_left, depth, other_class):
        """A definition of one file beside what the other file has in its place."""
        own, other = (left, right) if on_left else (right, left)
        side, twin_side = Side(own, block), Side(other, None, "none")
        # What the other file takes from this one: a name it imports, a method its class inherits.
        shared = (from_twin(other, own, block.name) if depth == 0 else
                  inherits_from_twin(other, own, other_class) if other_class else None)
        if shared:
            twin_side.how, twin_side.lines = ("imported" if depth == 0 else "inherited"), shared
            status, reason = twin_side.how, None
        elif block.name in expected.get(own.framework, ()):
            status, reason = "alone", None
        else:
            status = "unexpected"
            elsewhere = other.block((left_to_right if on_left else right_to_left).get(block.name, block.name))
            reason = (f"its twin stands elsewhere in {other.relative_path} (line {elsewhere.start}): the mirrored "
                      "files keep their definitions in the same order" if elsewhere else
                      f"no twin in {other.relative_path}: renamed or removed on one side only?")
        row = Row(f"{view.anchor}--{slug(block.name)}", *((side, twin_side) if on_left else (twin_side, side)),
                  status, depth, reason)
        row.line_pairs = [("alone", line, None) if on_left else ("alone", None, line) for line in block.whole]
        view.rows.append(row)

    twins(left.head, right.head, 0)
    for left_block, right_block in align(left.blocks, right.blocks, right_to_left):
        if left_block and right_block:
            twins(left_block, right_block, 0)
            if left_block.kind == "class" == right_block.kind:
                for left_member, right_member in align(left_block.members, right_block.members, right_to_left):
                    if left_member and right_member:
                        twins(left_member, right_member, 1)
                    else:
                        one_side(left_member or right_member, bool(left_member), 1,
                                 right_block if left_member else left_block)
        else:
            # A class without a twin is shown whole, its methods included.
            one_side(left_block or right_block, bool(left_block), 0, None)
    return view


def normalised(text):
    return " ".join(text.split())


def line_pairs(left, left_block, right, right_block):
    """[(kind, left line, right line)]: difflib's alignment of the twins' lines, each line on the
    same row as its twin; kind "same" or "changed" (a line on one side only is "changed" too)."""
    left_lines = list(range(left_block.start, left_block.end + 1))
    right_lines = list(range(right_block.start, right_block.end + 1))
    matcher = difflib.SequenceMatcher(None, [normalised(left.lines[i - 1]) for i in left_lines],
                                      [normalised(right.lines[i - 1]) for i in right_lines], autojunk=False)
    pairs = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        kind = "same" if tag == "equal" else "changed"
        pairs += [(kind, a, b) for a, b in zip_longest(left_lines[i1:i2], right_lines[j1:j2])]
    return pairs


def pair_views(sources=None):
    """Every mirrored file in every registered pair of frameworks; and the files of one framework alone."""
    sources = read_sources() if sources is None else sources
    frameworks = framework_order()
    views, alone = [], []
    for filename, by_framework in sources.items():
        if len(by_framework) == 1:
            alone.append(next(iter(by_framework.values())))
            continue
        for framework, registration in frameworks.items():
            against = registration.read_against
            if against in by_framework and framework in by_framework:
                views.append(pair_view(filename, by_framework[against], by_framework[framework], frameworks))
    return views, alone


# ---------------------------------------------------------------------------
# The source view, as the template shows it
# ---------------------------------------------------------------------------


WORD = re.compile(r"\w+|\s+|[^\w\s]")
MARKUP_PIECE = re.compile(r"(<[^>]*>)|(&[^;]+;|[^<&])", re.S)
# Below this similarity two lines are unrelated: the whole line is marked, no words in it.
SIMILAR_LINES = 0.5
MAX_INDENT = 60


def changed_spans(left_text, right_text):
    """The character ranges, in each line, of the words that differ (difflib over words)."""
    left_words, right_words = WORD.findall(left_text), WORD.findall(right_text)
    matcher = difflib.SequenceMatcher(None, left_words, right_words, autojunk=False)
    if matcher.ratio() < SIMILAR_LINES:
        return None, None
    def offsets(words):
        positions = [0]
        for word in words:
            positions.append(positions[-1] + len(word))
        return positions
    left_at, right_at = offsets(left_words), offsets(right_words)
    left_spans, right_spans = [], []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            if i2 > i1 and "".join(left_words[i1:i2]).strip():
                left_spans.append((left_at[i1], left_at[i2]))
            if j2 > j1 and "".join(right_words[j1:j2]).strip():
                right_spans.append((right_at[j1], right_at[j2]))
    return left_spans, right_spans


def with_marks(line_html, spans):
    """Pygments' HTML of a line with <mark> around the characters in spans (ranges of the text)."""
    if not spans:
        return line_html
    inside = lambda position: any(start <= position < end for start, end in spans)  # noqa: E731
    pieces, position, marking = [], 0, False
    for tag, character in MARKUP_PIECE.findall(line_html):
        if tag:
            # Pygments' spans do not nest: a mark closes before a tag and opens again after it.
            pieces.append(f"</mark>{tag}<mark>" if marking else tag)
            continue
        if inside(position) != marking:
            marking = not marking
            pieces.append("<mark>" if marking else "</mark>")
        pieces.append(character)
        position += 1
    if marking:
        pieces.append("</mark>")
    return re.sub(r"<mark></mark>", "", "".join(pieces))


def why_alone(source, block):
    """What says why a definition has no twin: its docstring's first paragraph, else the comment
    above it or beside its first line, else the declared reason."""
    if block.docstring:
        return block.docstring.split("\n\n")[0]
    comments = []
    for number in range(block.start, block.end + 1):
        text = source.lines[number - 1].strip()
        if not text.startswith("#"):
            if "  # " in text:
                comments.append(text.split("  # ", 1)[1])
            break
        comments.append(text.lstrip("# "))
    return " ".join(comments) or WITHOUT_TWIN_REASONS.get((source.framework, source.filename, block.name))


def code_line(source, number, spans=None):
    text = source.lines[number - 1]
    # Its indentation, so that a long line that wraps goes on further in (see the template's .i<n>).
    return {"number": number, "html": Markup(with_marks(source.html_lines[number - 1], spans)),
            "indent": min(len(text) - len(text.lstrip(" ")), MAX_INDENT)}


def row_lines(row):
    """The rows of the code table: [(kind, left line, right line)], each line a dict or None."""
    lines = []
    if row.status in ("imported", "inherited"):
        # The twin's definition on one side; on the other, the line that takes it from there.
        own, shared = (row.left, row.right) if row.left.how == "own" else (row.right, row.left)
        shared_lines = [code_line(shared.source, number) for number in range(shared.lines[0], shared.lines[1] + 1)]
        own_lines = [code_line(own.source, number) for number in own.block.whole]
        for own_line, shared_line in zip_longest(own_lines, shared_lines):
            pair = (own_line, shared_line) if own is row.left else (shared_line, own_line)
            lines.append(("shared", *pair))
        return lines
    for kind, left_number, right_number in row.line_pairs:
        left_spans = right_spans = None
        if kind == "changed" and left_number and right_number:
            left_spans, right_spans = changed_spans(row.left.source.lines[left_number - 1],
                                                    row.right.source.lines[right_number - 1])
        lines.append((kind, left_number and code_line(row.left.source, left_number, left_spans),
                      right_number and code_line(row.right.source, right_number, right_spans)))
    return lines


def side_label(side, twin):
    """What the label above a column says about its definition."""
    if side.how == "own":
        return {"name": side.block.name, "note": None}
    if side.how == "imported":
        return {"name": twin.block.name, "note": f"imported from {twin.source.module}"}
    if side.how == "inherited":
        return {"name": twin.block.name, "note": f"inherited from {twin.source.relative_path}"}
    return {"name": None, "note": "no twin here"}


# ---------------------------------------------------------------------------
# The README's tables of differences, and where each row is implemented
# ---------------------------------------------------------------------------


def markdown():
    """CommonMark with tables; the README's raw HTML (none today) is shown as text, not inserted."""
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def readme_tables(readme):
    """{heading: (header cells, [row cells])} of DIFFERENCE_TABLES, each cell its markdown source."""
    tokens = markdown().parse(readme.read_text())
    tables, heading, wanted = {}, None, None
    for index, token in enumerate(tokens):
        if token.type == "heading_open":
            heading = tokens[index + 1].content
            wanted = heading if heading in DIFFERENCE_TABLES and heading not in tables else None
        elif token.type == "table_open" and wanted:
            header, rows, row = None, [], None
            for cell in tokens[index + 1:]:
                if cell.type == "table_close":
                    break
                if cell.type == "tr_open":
                    row = []
                elif cell.type == "inline":
                    row.append(cell.content)
                elif cell.type == "tr_close":
                    header, rows = (row, rows) if header is None else (header, rows + [row])
            tables[wanted], wanted = (header, rows), None
    missing = [title for title in DIFFERENCE_TABLES if title not in tables]
    if missing:
        raise ValueError(f"{readme} has no table under the heading {', '.join(map(repr, missing))}")
    return tables


def place_anchors(place, views, alone_views):
    """[(label, anchor)] of the page's rows that show a place: (file, definition[, framework])."""
    filename, name, *framework = place
    anchors = []
    for view in views + alone_views:
        if view.filename != filename:
            continue
        for row in view.rows:
            sides = [side for side in (row.left, row.right) if side.block and side.how == "own"]
            if any(side.block.name == name and (not framework or side.source.framework == framework[0])
                   for side in sides):
                anchors.append((view.short_title, row.anchor))
    return anchors


TEST_NAME = re.compile(r"`((?:tests/[\w/]+\.py::)?test_\w+)`")


def test_functions(folder):
    """{name: [files]} of the test functions of every test_*.py in `folder` (ast: nothing imported)."""
    functions = {}
    for path in sorted(folder.glob("test_*.py")):
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                functions.setdefault(node.name, []).append(f"{folder.name}/{path.name}")
    return functions


def pinned_tests(cell, functions):
    """The tests a "pinned by" cell names, as {name, id (pytest's: file::name), found}. A bare name
    is found where exactly one test file defines it; file::name, where that file does."""
    tests = []
    for written in TEST_NAME.findall(cell):
        file, _, name = written.rpartition("::")
        files = functions.get(name, [])
        where = (file if file in files else None) if file else (files[0] if len(files) == 1 else None)
        tests.append({"name": name, "id": f"{where}::{name}" if where else written, "found": where is not None})
    return tests


def difference_tables(views, alone_views, readme, tests_folder=None):
    """The README's tables for the template: each row's cells as HTML, its places with their links,
    the tests that pin it (a table's PINNED_BY column, resolved in tests_folder: the README's
    folder's tests/ by default); and, for each source row, the topics it implements (for links back)."""
    functions = test_functions(tests_folder or readme.parent / TESTS)
    tables, back_links = [], {}
    for title, (header, rows) in readme_tables(readme).items():
        table_rows = []
        pinned_by = header.index(PINNED_BY) if PINNED_BY in header else None
        for cells in rows:
            topic = cells[0]
            anchor = f"difference--{slug(topic)}"
            places = []
            for place in PLACES.get(topic, []):
                links = place_anchors(place, views, alone_views)
                places.append({"file": place[0], "name": place[1], "links": links})
                for _, row_anchor in links:
                    back_links.setdefault(row_anchor, []).append((topic, anchor))
            tests = pinned_tests(cells[pinned_by], functions) if pinned_by is not None else []
            test_files = sorted({test["id"].split("::")[0] for test in tests if test["found"]})
            table_rows.append({"topic": topic, "anchor": anchor, "places": places, "tests": tests,
                               "test_files": test_files,
                               "cells": [Markup(markdown().renderInline(cell)) for cell in cells]})
        tables.append({"title": title, "anchor": slug(title).lower(),
                       "header": [Markup(markdown().renderInline(cell)) for cell in header], "rows": table_rows})
    return tables, back_links


# ---------------------------------------------------------------------------
# Results: results.json's and bench.json's content, the plots
# ---------------------------------------------------------------------------


SVG_ID = re.compile(r'\bid="([^"]+)"')


def inline_svg(path, prefix):
    """An SVG file's <svg> element for inlining: no XML prolog or metadata, and its ids prefixed,
    so that two plots' ids (matplotlib numbers them alike) do not collide on one page."""
    text = path.read_text()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    for name in sorted(set(SVG_ID.findall(text)), key=len, reverse=True):
        text = text.replace(f'id="{name}"', f'id="{prefix}-{name}"').replace(f"#{name})", f"#{prefix}-{name})")
        text = text.replace(f'href="#{name}"', f'href="#{prefix}-{name}"')
    return Markup(text)


def results_view(results, bench, out):
    """What the results part of the page shows, or None."""
    if results is None and bench is None:
        return None
    view = {"results": results, "bench": bench, "plots": [], "summary": None, "evaluation": None, "deployment": None}
    if results is None:
        return view
    from common.report import console, plots  # noqa: PLC0415 (matplotlib, only when there are results)
    bounds = float32_bounds()
    if "evaluation" in results:
        path = Path(out) / f"{plots.EVALUATION}.svg"
        header, rows = console.evaluation_rows(results)
        view["evaluation"] = {"table": (header, coloured(rows, console.evaluation_fractions(results, bounds))),
                              "svg": inline_svg(path, plots.EVALUATION) if path.exists() else None,
                              "sources": list(zip(*(results["evaluation"][key] for key in
                                                    ("rows", "files", "dtypes", "sources"))))}
    if "deployment" in results:
        path = Path(out) / f"{plots.DEPLOYMENT}.svg"
        header, rows = console.deployment_rows(results)
        deployment = results["deployment"]
        view["deployment"] = {
            "table": (header, coloured(rows, console.deployment_fractions(results, bounds))),
            "svg": inline_svg(path, plots.DEPLOYMENT) if path.exists() else None,
            "verdict": console.bound_verdict(results, bounds),
            "operations": console.operation_rows(results), "throughput": console.throughput_rows(results),
            "sources": list(zip(*(deployment[key] for key in ("rows", "files", "dtypes", "sources")))),
            "not_run": sorted({(name, reason) for row in deployment["not_run"] for name, reason in row.items()})}
    if "runs" in results:
        view["summary"] = console.summary_rows(results)
        for stem, title in ((plots.CURVES, "Training curves"), (plots.DIVERGENCE, "How far the implementations drift apart")):
            path = Path(out) / f"{stem}.svg"
            if path.exists():
                view["plots"].append({"id": f"plot-{stem}", "title": title, "svg": inline_svg(path, stem)})
        view["parallel"] = {name: run["data_parallel"] for name, run in results["runs"].items() if "data_parallel" in run}
        view["not_run"] = {name: run["not_run"] for name, run in results["runs"].items() if "not_run" in run}
        view["unbiased_note"] = console.compares_torch_builtin(results)
    return view


def coloured(rows, fractions):
    """A matrix's text rows, each cell beside the class that colours it against its float32 bound
    (fractions: each cell's difference as a fraction of it, None where unknown): 'rounding' at most
    the bound, 'beyond' past it, 'exact' for no difference at all; the first cell, the row's name."""
    def colour(fraction):
        if fraction is None:
            return ""
        return "exact" if fraction == 0 else "rounding" if fraction <= 1 else "beyond"
    return [[(row[0], ""), *((cell, colour(fraction)) for cell, fraction in zip(row[1:], row_fractions))]
            for row, row_fractions in zip(rows, fractions)]


def format_value(value):
    if isinstance(value, float):
        return str(value) if len(str(value)) <= 10 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{key}: {format_value(item)}" for key, item in value.items())
    return "—" if value is None else str(value)


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------


def alone_view(source):
    """A file of one framework alone: each definition in one column."""
    view = PairView(source.filename, source, source, framework_order()[source.framework].title, "", [])
    for block in [source.head, *source.blocks]:
        anchor = f"{source.filename[:-3]}--{source.framework}--{slug(block.name)}"
        row = Row(anchor, Side(source, block), Side(source, None, "none"), "single")
        row.line_pairs = [("alone", line, None) for line in block.whole]
        view.rows.append(row)
    return view


def render(results=None, bench=None, out=None, root=ROOT):
    """The page's HTML: the source view always; results (results.json's content) and plots from
    `out`, or bench (bench.json's content), when given."""
    views, alone_sources = pair_views(read_sources(root))
    alone_views = [alone_view(source) for source in alone_sources]
    tables, back_links = difference_tables(views, alone_views, root / "README.md")
    rendered_views = []
    for view in views + alone_views:
        rows = []
        for row in view.rows:
            rows.append({"row": row, "lines": row_lines(row), "topics": back_links.get(row.anchor, []),
                         "left": side_label(row.left, row.right), "right": side_label(row.right, row.left),
                         "why": (why_alone(*(
                             (row.left.source, row.left.block) if row.left.how == "own" else
                             (row.right.source, row.right.block))) if row.status == "alone" else row.reason)})
        alone = view.left is view.right
        rendered_views.append({"view": view, "rows": rows, "alone": alone,
                               "caption": (view.left.head.docstring or "").split("\n\n")[0] if alone else None})
    files = list(dict.fromkeys(view["view"].filename for view in rendered_views))
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["value"] = format_value
    template = environment.get_template("report.html.j2")
    return template.render(
        views=rendered_views, files=files, tables=tables, problems=[
            (view["view"], row["row"]) for view in rendered_views for row in view["rows"]
            if row["row"].status == "unexpected"],
        missing_places=[row["topic"] for table in tables for row in table["rows"] if not row["places"]] + [
            f"{row['topic']}: {place['name']} ({place['file']})" for table in tables for row in table["rows"]
            for place in row["places"] if not place["links"]],
        missing_tests=[f"{row['topic']}: {test['id']}" for table in tables for row in table["rows"]
                       for test in row["tests"] if not test["found"]],
        run=results_view(results, bench, out), max_indent=MAX_INDENT,
        highlight_css=Markup(HtmlFormatter(style="default").get_style_defs(".code"))) + "\n"


def write(out, results=None, bench=None):
    """Write report.html into `out`, whole or not at all (common.files): a run that is interrupted
    leaves either the whole page or none. Returns its path."""
    os.makedirs(out, exist_ok=True)
    return write_text(os.path.join(out, PAGE), render(results, bench, out))
