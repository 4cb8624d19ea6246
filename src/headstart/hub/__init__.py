"""The local hub: a folder of bundles with an `index.json`, to share specialists and find them again.

    headstart hub add runs/ants --hub hub/
    headstart hub search --hub hub/ --task image-classification --metric accuracy --min-value 0.9
    headstart hub pull ants --hub hub/ --out elsewhere/ants      # every file's sha256 verified
    headstart hub push ants --hub hub/ --repo-id me/ants          # the Hugging Face Hub, when online

`index` builds the index from the bundles' manifests, `local` adds, lists, searches, shows, pulls and
removes, `remote` pushes to and pulls from the Hugging Face Hub. Importing this package imports no
torch: a hub is listed and searched from JSON alone.
"""
from .index import HubError, check_name, rebuild_index
from .local import TASKS, add, entries, list_entries, pull, remove, search, show
from .remote import pull_remote, push

__all__ = ["HubError", "TASKS", "add", "check_name", "entries", "list_entries", "pull", "pull_remote", "push",
           "rebuild_index", "remove", "search", "show"]
