"""Knowledge base, gRPC client, ranking, HTTP API and upload page of ProductLens."""

# Load Python's own SQLite before anything imports TensorFlow: TensorFlow exports the symbols of a
# bundled SQLite built without FTS5, and a later `import sqlite3` would bind to that copy.
import sqlite3  # noqa: F401
