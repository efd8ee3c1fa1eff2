"""Export a run to a transformers checkpoint that AutoModelForCausalLM and AutoTokenizer load with no
code of ours.

    python export.py <run dir or checkpoint> <out folder>

A run dir exports its newest intact checkpoint. The out folder gets model.safetensors, config.json,
generation_config.json, tokenizer.json and tokenizer_config.json (EOS = the end-of-document token).
GPT-2-style stacks become GPT2LMHeadModel; pre-RMSNorm + RoPE + SwiGLU LlamaForCausalLM, with QK-norm
Qwen3ForCausalLM; any other stack is refused in one line naming what does not map (docs/hf_interop.md).
"""
from config import ArgumentParser, run_main
from hf import export_checkpoint


def main():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                            hint="; usage: python export.py <run dir or checkpoint> <out folder>")
    parser.add_argument("run", help="a run dir (its newest intact checkpoint is exported) or a checkpoint folder")
    parser.add_argument("out", help="a new folder for the transformers checkpoint")
    args = parser.parse_args()
    export_checkpoint(args.run, args.out)


if __name__ == "__main__":
    run_main(main)
