"""FaceNet-style face embeddings (paper Table 14): the embedding task, LFW-style verification and FAISS
search indexes."""

from mobilenets.tasks.faces.embedding import FaceEmbedder

__all__ = ["FaceEmbedder"]
