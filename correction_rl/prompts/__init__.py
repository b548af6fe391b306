"""Where prompts come from: prompt files, the seeded resumable stream, and the bookkeeping of prompts handed to teachers (in flight at a checkpoint)."""
