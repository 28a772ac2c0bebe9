"""The cloud launcher: experiment configs and the plan (``launcher``), the Modal apps (``modal_app``, ``modal_sandbox``)."""
