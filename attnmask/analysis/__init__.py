"""Stage 5, reading stores: analyze (head statistics), plot (pictures) and report (one page). Imports masks
and stores."""
