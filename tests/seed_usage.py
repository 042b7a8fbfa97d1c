# The "Usage Examples" of the storage contract (shared/seeds/004_ac27444b538d58e5.txt), copied verbatim.
from attention_analyzer import AttentionAnalyzer

analyzer = AttentionAnalyzer("outputs/batch_name/attention_maps")

# Load single step: [blocks, heads, spatial, tokens]
step_0 = analyzer.load_step("prompt_000_vid001", "flower", 0)
print(f"Shape: {step_0.shape}")  # [30, 12, 1170, 1]

# Load all steps: [steps, blocks, heads, spatial, tokens]
all_steps = analyzer.load_all_steps("prompt_000_vid001", "flower")
print(f"Shape: {all_steps.shape}")  # [3, 30, 12, 1170, 1]

# Average across transformer blocks: [steps, heads, spatial, tokens]
block_averaged = analyzer.aggregate_blocks(all_steps)

# Average across attention heads: [steps, spatial, tokens]
head_averaged = analyzer.aggregate_heads(block_averaged)

# Get temporal evolution: [steps, spatial, tokens]
temporal = analyzer.get_temporal_evolution("prompt_000_vid001", "flower")

# Reshape to video dimensions: [steps, frames, height, width]
spatial_map = analyzer.get_spatial_attention_map(
    "prompt_000_vid001", "flower", step=0,
    height=240, width=416, frames=3
)
print(block_averaged.shape, head_averaged.shape, temporal.shape, spatial_map.shape)
