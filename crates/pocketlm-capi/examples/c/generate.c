/*
 * generate.c: load a model, stream one answer, print statistics. The C API's example.
 *
 *   cc generate.c -I ../../include -L <target dir> -lpocketlm_capi -o generate
 *   ./generate [--model PATH] [--max-tokens N] [--greedy] "Write a haiku about the sea."
 *
 * Without --model it loads the default model (SmolLM2-135M-Instruct Q4_1, downloaded into
 * $POCKETLM_HOME on first use). --greedy is the CLI's --temp 0 (argmax, no repetition
 * penalty). The answer goes to stdout as it is generated, the statistics to stderr.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pocketlm.h"

/* Called with each piece of text as it becomes final; returning non-zero would stop. */
static int32_t print_piece(const char *piece, size_t len, void *user_data) {
  (void)user_data;
  fwrite(piece, 1, len, stdout);
  fflush(stdout);
  return 0;
}

static int fail(const char *what) {
  const char *msg = pocketlm_last_error();
  fprintf(stderr, "error: %s: %s\n", what, msg ? msg : "(no message)");
  return 1;
}

int main(int argc, char **argv) {
  const char *model_path = NULL; /* NULL: the default model */
  const char *prompt = NULL;
  long max_tokens = 64;
  int greedy = 0;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
      model_path = argv[++i];
    } else if (strcmp(argv[i], "--max-tokens") == 0 && i + 1 < argc) {
      max_tokens = strtol(argv[++i], NULL, 10);
    } else if (strcmp(argv[i], "--greedy") == 0) {
      greedy = 1;
    } else {
      prompt = argv[i];
    }
  }
  if (prompt == NULL || max_tokens <= 0) {
    fprintf(stderr, "usage: %s [--model PATH] [--max-tokens N] [--greedy] PROMPT\n", argv[0]);
    return 2;
  }

  fprintf(stderr, "pocketlm %s\n", pocketlm_version());
  PocketlmModel *model = NULL;
  if (pocketlm_model_load(model_path, NULL, &model) != POCKETLM_STATUS_OK) {
    return fail("loading the model");
  }

  PocketlmGenerateParams params;
  if (pocketlm_generate_params_default(model, &params) != POCKETLM_STATUS_OK) {
    pocketlm_model_free(model);
    return fail("default parameters");
  }
  params.max_tokens = (uint32_t)max_tokens;
  if (greedy) {
    params.temperature = 0.0f;
    params.repetition_penalty = 1.0f;
  }

  PocketlmGenerateStats stats;
  PocketlmStatus status =
      pocketlm_generate(model, prompt, &params, print_piece, NULL, &stats, NULL);
  if (status != POCKETLM_STATUS_OK) {
    pocketlm_model_free(model);
    return fail("generating");
  }
  printf("\n");
  fprintf(stderr, "prompt: %llu tokens, %.1f tokens/s; generation: %llu tokens, %.1f tokens/s (finish reason %d)\n",
          (unsigned long long)stats.prompt_tokens, stats.prefill_tokens_per_second,
          (unsigned long long)stats.generated_tokens, stats.decode_tokens_per_second,
          (int)stats.finish_reason);
  pocketlm_model_free(model);
  return 0;
}
