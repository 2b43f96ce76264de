"""Names of model file formats that the service and the pipeline both speak."""

from __future__ import annotations

# llama.cpp quant types by name -> llama_ftype (include/llama.h): what a GGUF's general.file_type means.
GGUF_QUANT_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_M": 17,
                    "Q6_K": 18, "IQ4_NL": 25, "BF16": 32}
GGUF_FILE_TYPES = {ftype: name for name, ftype in GGUF_QUANT_TYPES.items()}
