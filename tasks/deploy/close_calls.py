"""Close-call routing: an int8 classifier that hands the images it is unsure of to the float model.

At 0.25-128, int8 moves Google's logits by about 0.3 (the median of each image's largest change), while
float's own top two lie within 0.05 of each other on 5-10 % of real photos: no int8 keeps those calls, not
even with all but the last convolution in float. An image whose int8 top-two margin is wide keeps its
top-1 under such a change, so only the narrow ones need float. The routed graph runs the int8 network on
the batch and, when some of its images are close calls (int8 top-two margin below ``margin``), the float
network on those images only (an ONNX ``If``; ``Gather`` and ``ScatterND``), whose logits replace int8's
there. An image's output does not depend on the rest of its batch.
"""

from __future__ import annotations

import numpy as np

#: Prefix of the routing's own value and node names, and of the float network's inside the ``If``.
ROUTING = "close_call/"
FLOAT = "float/"


def top_two_margins(logits: np.ndarray) -> np.ndarray:
    """Each row's top logit minus its second (0 for a single class)."""
    if logits.shape[1] < 2:
        return np.zeros(len(logits), logits.dtype)
    top_two = np.partition(logits, -2, axis=1)[:, -2:]
    return top_two[:, 1] - top_two[:, 0]


def close_call_margin(reference: np.ndarray, quantized: np.ndarray) -> float | None:
    """The routing margin that hands every image whose top-1 int8 flips to float: just above the widest
    int8 top-two margin among them (a relative step, so a margin of 0 is routed too). None when none
    flips."""
    flipped = reference.argmax(1) != quantized.argmax(1)
    if not flipped.any():
        return None
    widest = float(top_two_margins(quantized)[flipped].max())
    return float(np.nextafter(np.float32(widest * (1 + 1e-4)), np.float32(np.inf)))


def routed_share(quantized: np.ndarray, margin: float) -> float:
    """The share of images a routing ``margin`` hands to float, by their int8 logits."""
    return float((top_two_margins(quantized) < np.float32(margin)).mean())


def route_close_calls(int8_model: object, float_model: object, margin: float) -> object:
    """One ONNX model: ``int8_model`` whose logits are replaced by ``float_model``'s on the images whose
    int8 top-two margin is below ``margin``. Both take the same input and give one (N, classes) output;
    the result keeps ``int8_model``'s input and output names and metadata. The arguments are
    ``onnx.ModelProto``s, both changed in place; ``int8_model`` is returned."""
    from onnx import TensorProto, helper, numpy_helper

    graph, float_graph = int8_model.graph, float_model.graph
    if len(graph.output) != 1 or len(float_graph.output) != 1:
        raise ValueError("close-call routing needs models with one output (the logits)")
    output = graph.output[0].name
    int8_logits = f"int8/{output}"
    for node in graph.node:
        node.input[:] = [int8_logits if value == output else value for value in node.input]
        node.output[:] = [int8_logits if value == output else value for value in node.output]

    # the float network inside the If, on the close calls only: every name of its own prefixed, its input
    # the images gathered from the batch
    def name(value: str) -> str:
        return ROUTING + value

    renamed = {init.name: FLOAT + init.name for init in float_graph.initializer}
    renamed[float_graph.input[0].name] = name("close_images")
    renamed.update({value: FLOAT + value for node in float_graph.node for value in node.output})
    for node in float_graph.node:
        node.input[:] = [renamed.get(value, value) for value in node.input]
        node.output[:] = [renamed[value] for value in node.output]
        node.name = FLOAT + node.name
    for init in float_graph.initializer:
        init.name = renamed[init.name]
    float_logits = renamed[float_graph.output[0].name]

    routed = [
        helper.make_node("TopK", [int8_logits, name("k")], [name("top_two"), name("top_two_index")], axis=1),
        helper.make_node("ReduceMax", [name("top_two")], [name("first")], axes=[1], keepdims=1),
        helper.make_node("ReduceMin", [name("top_two")], [name("second")], axes=[1], keepdims=1),
        helper.make_node("Sub", [name("first"), name("second")], [name("margin")]),
        helper.make_node("Less", [name("margin"), name("threshold")], [name("close")]),
        helper.make_node("Cast", [name("close")], [name("close_float")], to=TensorProto.FLOAT),
        # an empty batch reduces to -inf: no close call
        helper.make_node("ReduceMax", [name("close_float")], [name("any_float")], keepdims=0),
        helper.make_node("Greater", [name("any_float"), name("zero")], [name("any")]),
    ]
    logits = helper.make_tensor_value_info
    with_float = helper.make_graph(
        [
            helper.make_node("Reshape", [name("close"), name("flat")], [name("close_rows")]),
            helper.make_node("NonZero", [name("close_rows")], [name("close_index_row")]),
            helper.make_node("Transpose", [name("close_index_row")], [name("close_index")], perm=[1, 0]),
            helper.make_node("Reshape", [name("close_index"), name("flat")], [name("close_index_flat")]),
            helper.make_node(
                "Gather", [graph.input[0].name, name("close_index_flat")], [name("close_images")], axis=0
            ),
            *float_graph.node,
            helper.make_node("ScatterND", [int8_logits, name("close_index"), float_logits], [name("routed")]),
        ],
        "float_on_close_calls",
        [],
        [logits(name("routed"), TensorProto.FLOAT, None)],
        initializer=float_graph.initializer,
    )
    int8_only = helper.make_graph(
        [helper.make_node("Identity", [int8_logits], [name("int8")])],
        "int8_only",
        [],
        [logits(name("int8"), TensorProto.FLOAT, None)],
    )
    routed.append(
        helper.make_node(
            "If", [name("any")], [output], name=name("if"), then_branch=with_float, else_branch=int8_only
        )
    )
    graph.node.extend(routed)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([2], np.int64), name("k")),
            numpy_helper.from_array(np.array(margin, np.float32), name("threshold")),
            numpy_helper.from_array(np.array(0.0, np.float32), name("zero")),
            numpy_helper.from_array(np.array([-1], np.int64), name("flat")),
        ]
    )
    return int8_model
