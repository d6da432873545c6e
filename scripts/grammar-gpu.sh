#!/usr/bin/env bash
# Constrained decoding on CUDA with the grammar's mask applied by the GPU sampler, in one
# `device` call (run from the repo root; carry: [".gpu"], holding `pocketlm.xz` and `lc.tgz`):
#  1. `gpu-selftest` (its sampling cases include masks: most ids, five ids, greedy top-1);
#  2. on a random Llama-3.2-1B-shaped Q4_0 (vocabulary 128,256), `bench` tg128 and tg128
#     +grammar (greedy under a JSON Schema) with the mask on the GPU (the default) and with
#     POCKETLM_DEVICE_MASK=0 (the logits copied back and masked on the CPU), $REPS each;
#  3. `generate --json-schema` on the GPU, greedy and sampled: the output must parse as JSON
#     with the schema's fields.
set -uo pipefail
. scripts/gpu-setup.sh
REPS=${REPS:-3}
(cd $W && tar xzf $R/.gpu/lc.tgz lc/gguf-py lc/models/ggml-vocab-llama-bpe.gguf 2>/dev/null || tar xzf $R/.gpu/lc.tgz)
export VOCAB_DIR=$W/lc/models PYTHONPATH=$W/lc/gguf-py CTX=4096
M=$W/1b-q4_0.gguf
[ -f $M ] || (cd $W && python3 $R/scripts/make_random_gguf.py 1b-q4_0.gguf q4_0 --shape 1b >/dev/null) &
mk=$!
stamp selftest
$PL gpu-selftest > $W/selftest.txt 2>&1
grep FAIL $W/selftest.txt | head -5; grep -E "mask" $W/selftest.txt | head -6; tail -1 $W/selftest.txt
wait $mk
cat > $W/schema.json <<'JSON'
{"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
 "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
 "required": ["name", "age", "tags"], "additionalProperties": false}
JSON
for v in gpu cpu gpu2 cpu2; do
  case $v in cpu*) export POCKETLM_DEVICE_MASK=0;; *) unset POCKETLM_DEVICE_MASK;; esac
  stamp "bench, mask on the $v"
  $PL bench -m $M --device cuda -p 0 -n 128 -r $REPS --json-schema $W/schema.json 2>&1 | grep '^|' | tail -2
done
unset POCKETLM_DEVICE_MASK
for t in 0 0.8; do
  stamp "generate --temp $t"
  $PL generate -m $M --device cuda --no-chat-template -p "A person:" --json-schema $W/schema.json --max-tokens 200 \
    --temp $t --seed 3 2>/dev/null > $W/out-$t.txt
  python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).read()); print('valid JSON, keys', sorted(d))" $W/out-$t.txt \
    || { echo "not JSON:"; head -c 400 $W/out-$t.txt; }
done
stamp done
