"""The original mlxterp README's examples run as written.

The code blocks below are copied verbatim from the original README (custom models, tracing,
interventions, custom interventions, component access, layer analysis). The real-model
examples there load Llama-3.2-1B from the hub; here ``model`` is a random-weight Llama with
the same width (2048) and enough layers for the layer numbers the examples use.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from helpers import tiny_llama

from mlxterp import InterpretableModel

CUSTOM_MODEL = '''
from mlxterp import InterpretableModel
import mlx.core as mx
import mlx.nn as nn

# Create your own model
class SimpleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(64, 64) for _ in range(4)]

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x

# Wrap with InterpretableModel
model = InterpretableModel(SimpleModel())

# Trace execution
input_data = mx.random.normal((1, 64))
with model.trace(input_data) as trace:
    pass

# Access activations
layer_0 = trace.activations['model.layers.0']
print(f"Layer 0 shape: {layer_0.shape}")
'''

QUICK_START_TRACE = '''
# Run forward pass and capture ALL activations
with model.trace("Hello, how are you?") as trace:
    pass  # Automatically captures ~196 activations!

# Access any activation by name
print(f"Captured {len(trace.activations)} activations")

# Fine-grained access to model internals
layer_5_attn = trace.activations['model.model.layers.5.self_attn']
q_proj_3 = trace.activations['model.model.layers.3.self_attn.q_proj']
mlp_7_gate = trace.activations['model.model.layers.7.mlp.gate_proj']
output = trace.activations['__model_output__']

print(f"Layer 5 attention: {layer_5_attn.shape}")
print(f"Layer 3 Q projection: {q_proj_3.shape}")
print(f"Output: {output.shape}")
'''

TOKENIZER = '''
# Encode text to tokens
text = "The capital of France is"
tokens = model.encode(text)
print(f"Tokens: {tokens}")

# Decode tokens back to text
decoded = model.decode(tokens)
print(f"Decoded: '{decoded}'")

# Analyze individual tokens
for i, token_id in enumerate(tokens):
    token_str = model.token_to_str(token_id)
    print(f"Position {i}: {token_id} -> '{token_str}'")

# Get vocabulary info
print(f"Vocabulary size: {model.vocab_size}")

# Find token position and extract its activation
with model.trace(text) as trace:
    layer_8_out = trace.activations['model.model.layers.8']

# Extract activation at "France" token position
for i, token_id in enumerate(tokens):
    if "France" in model.token_to_str(token_id):
        france_activation = layer_8_out[0, i, :]
        print(f"Activation at 'France': {france_activation.shape}")
'''

INTERVENTIONS = '''
from mlxterp import interventions as iv

# Scale down attention in layer 5
with model.trace("Test input",
                 interventions={'model.model.layers.5.self_attn': iv.scale(0.5)}) as trace:
    output = trace.activations['__model_output__']

# Zero out MLP in layer 3
with model.trace("Test", interventions={'model.model.layers.3.mlp': iv.zero_out}):
    output = model.output.save()

# Add steering vectors
steering_vector = mx.random.normal((2048,))
with model.trace("Test",
                 interventions={'model.model.layers.10': iv.add_vector(steering_vector)}):
    steered_output = model.output.save()

# Compose multiple interventions
combined = iv.compose().add(iv.scale(0.5)).add(iv.noise(std=0.1)).build()
with model.trace("Test", interventions={'model.model.layers.3': combined}):
    output = model.output.save()
'''

COMPONENTS = '''
with model.trace("Analyze this text") as trace:
    pass

# Access Q/K/V projections
q_proj_5 = trace.activations['model.model.layers.5.self_attn.q_proj']
k_proj_5 = trace.activations['model.model.layers.5.self_attn.k_proj']
v_proj_5 = trace.activations['model.model.layers.5.self_attn.v_proj']

# Access MLP components
gate_proj_3 = trace.activations['model.model.layers.3.mlp.gate_proj']
up_proj_3 = trace.activations['model.model.layers.3.mlp.up_proj']
down_proj_3 = trace.activations['model.model.layers.3.mlp.down_proj']

print(f"Q projection shape: {q_proj_5.shape}")
print(f"Gate projection shape: {gate_proj_3.shape}")
'''

COMPONENT_INTERVENTIONS = '''
# Zero out Q projections in layer 5
with model.trace("Test",
                 interventions={'model.model.layers.5.self_attn.q_proj': iv.zero_out}):
    output = model.output.save()

# Scale MLP gate in layer 3
with model.trace("Test",
                 interventions={'model.model.layers.3.mlp.gate_proj': iv.scale(0.5)}):
    output = model.output.save()
'''

CUSTOM_INTERVENTION = '''
def my_custom_intervention(activation: mx.array) -> mx.array:
    """Custom intervention: normalize and scale"""
    normalized = activation / mx.linalg.norm(activation)
    return normalized * 10.0

with model.trace("Input",
                 interventions={'model.model.layers.5': my_custom_intervention}):
    output = model.output.save()
'''

LAYER_ANALYSIS = '''
with model.trace("Input text") as trace:
    pass

# Collect all layer outputs
layer_norms = []
for i in range(16):  # For Llama-3.2-1B
    layer_name = f'model.model.layers.{i}'
    if layer_name in trace.activations:
        layer_norms.append(mx.linalg.norm(trace.activations[layer_name]).item())

# Visualize layer norms
for i, norm in enumerate(layer_norms):
    print(f"Layer {i}: {'#' * int(norm / 100)}")
'''


@pytest.fixture(scope="module")
def readme_model(wrapped_tokenizer):
    module = tiny_llama(
        hidden_size=2048,
        num_hidden_layers=11,
        num_attention_heads=16,
        num_key_value_heads=1,
        intermediate_size=64,
    )
    return InterpretableModel(module, tokenizer=wrapped_tokenizer)


def run_example(code: str, **names) -> dict:
    namespace = {"mx": mx, **names}
    exec(compile(code, "README example", "exec"), namespace)
    return namespace


def test_custom_model_example():
    ns = run_example(CUSTOM_MODEL)
    assert ns["layer_0"].shape == (1, 64)
    assert isinstance(ns["model"], InterpretableModel)


def test_quick_start_tracing(readme_model, wrapped_tokenizer):
    ns = run_example(QUICK_START_TRACE, model=readme_model)
    n = len(wrapped_tokenizer.encode("Hello, how are you?"))
    assert ns["layer_5_attn"].shape == (1, n, 2048)
    assert ns["mlp_7_gate"].shape == (1, n, 64)
    assert ns["output"].shape == (1, n, 320)


def test_tokenizer_example(readme_model):
    ns = run_example(TOKENIZER, model=readme_model)
    assert ns["decoded"] == "The capital of France is"
    assert ns["layer_8_out"].shape == (1, len(ns["tokens"]), 2048)


def test_intervention_examples(readme_model):
    plain = readme_model.run("Test").output
    ns = run_example(INTERVENTIONS, model=readme_model)
    for name in ("output", "steered_output"):
        assert ns[name].shape == plain.shape
        assert not mx.array_equal(ns[name], plain).item()
    ns = run_example(COMPONENT_INTERVENTIONS, model=readme_model, iv=ns["iv"])
    assert not mx.array_equal(ns["output"], plain).item()


def test_component_access_and_custom_intervention(readme_model):
    ns = run_example(COMPONENTS, model=readme_model)
    assert ns["k_proj_5"].shape[-1] == 128  # one KV head of 128
    assert ns["down_proj_3"].shape[-1] == 2048
    ns = run_example(CUSTOM_INTERVENTION, model=readme_model)
    with readme_model.trace("Input") as trace:
        pass
    assert not mx.array_equal(ns["output"], trace.output).item()


def test_layer_analysis_example(readme_model):
    ns = run_example(LAYER_ANALYSIS, model=readme_model)
    assert len(ns["layer_norms"]) == 11
