/*
 * embed.c: load a sentence-embedding model, embed texts, print the vectors and how similar
 * the texts are. The C API's embedding example.
 *
 *   cc embed.c -I ../../include -L <target dir> -lpocketlm_capi -lm -o embed
 *   ./embed [--model PATH] [--no-normalize] [--batch-size N] \
 *       "A man is eating food." "A man rides a horse."
 *
 * Without --model it loads all-MiniLM-L6-v2 (384 dimensions, downloaded into $POCKETLM_HOME
 * on first use). Each text's embedding goes to stdout as one line of space-separated floats
 * (in the order given); the cosine similarity of the first text with each other one goes to
 * stderr. --batch-size: texts per forward pass (default 32; each batch is padded to its
 * longest text, so texts of very different lengths run faster in small batches).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pocketlm.h"

static int fail(const char *what) {
  const char *msg = pocketlm_last_error();
  fprintf(stderr, "error: %s: %s\n", what, msg ? msg : "(no message)");
  return 1;
}

static double cosine(const float *a, const float *b, size_t d) {
  double dot = 0, na = 0, nb = 0;
  for (size_t k = 0; k < d; k++) {
    dot += (double)a[k] * b[k];
    na += (double)a[k] * a[k];
    nb += (double)b[k] * b[k];
  }
  return dot / (sqrt(na) * sqrt(nb));
}

int main(int argc, char **argv) {
  const char *model_path = NULL; /* NULL: all-MiniLM-L6-v2 */
  PocketlmEmbedParams params = {0}; /* the defaults: the model's normalization and dimension */
  const char **texts = calloc((size_t)argc, sizeof *texts);
  size_t n = 0;
  if (texts == NULL) {
    fprintf(stderr, "error: out of memory\n");
    return 1;
  }
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
      model_path = argv[++i];
    } else if (strcmp(argv[i], "--no-normalize") == 0) {
      params.normalize = POCKETLM_NORMALIZE_OFF;
    } else if (strcmp(argv[i], "--batch-size") == 0 && i + 1 < argc) {
      params.batch_size = (uint32_t)strtoul(argv[++i], NULL, 10);
    } else {
      texts[n++] = argv[i];
    }
  }
  if (n == 0) {
    fprintf(stderr, "usage: %s [--model PATH] [--no-normalize] [--batch-size N] TEXT...\n",
            argv[0]);
    free(texts);
    return 2;
  }

  PocketlmEmbeddingModel *model = NULL;
  if (pocketlm_embedding_model_load(model_path, NULL, &model) != POCKETLM_STATUS_OK) {
    free(texts);
    return fail("loading the embedding model");
  }
  size_t dim = pocketlm_embedding_dimension(model);
  float *vectors = malloc(n * dim * sizeof *vectors);
  if (vectors == NULL) {
    pocketlm_embedding_model_free(model);
    free(texts);
    fprintf(stderr, "error: out of memory\n");
    return 1;
  }
  /* Row i of `vectors` (dim floats) is the embedding of texts[i]. */
  if (pocketlm_embed(model, texts, n, &params, vectors, n * dim) != POCKETLM_STATUS_OK) {
    free(vectors);
    pocketlm_embedding_model_free(model);
    free(texts);
    return fail("embedding");
  }

  for (size_t i = 0; i < n; i++) {
    for (size_t k = 0; k < dim; k++) {
      printf(k ? " %.9g" : "%.9g", vectors[i * dim + k]);
    }
    printf("\n");
  }
  fprintf(stderr, "%zu texts, %zu dimensions\n", n, dim);
  for (size_t i = 1; i < n; i++) {
    fprintf(stderr, "cosine(text 1, text %zu) = %.4f\n", i + 1,
            cosine(vectors, vectors + i * dim, dim));
  }

  free(vectors);
  pocketlm_embedding_model_free(model);
  free(texts);
  return 0;
}
