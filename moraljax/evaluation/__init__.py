"""The generalisation suite (SPEC.md section 8): its settings and protocol, and its compiled play."""
