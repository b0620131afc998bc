"""The one-import change from mlx_lm: load a flash model, then use mlx_lm as usual.

    python examples/one_import.py     # the default model, pulled and converted on first use
"""

from mlx_lm import generate, stream_generate

from mlx_flash import load  # instead of: from mlx_lm import load
from mlx_flash.cli.common import default_model_dir

model, tokenizer = load(default_model_dir())  # FFN weights stay on flash; dram_budget="2GB" caps
messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

print(generate(model, tokenizer, prompt=prompt, max_tokens=48))
for response in stream_generate(model, tokenizer, prompt=prompt, max_tokens=48):
    print(response.text, end="", flush=True)
totals = model.flash.stats.totals()  # what the flash path did, per decoded token
print(f"\n{totals['bytes_read_per_token'] / 2**20:.2f} MiB read/token, hit {totals['hit_rate']:.0%}")
