"""Command-line clients for a served model repository (installed as `ft-exporter-*` entry points).

prompt        text prompts through the ensemble (optionally streamed), like the seeds' client.py
end_to_end    preprocessing, model, postprocessing and the ensemble in turn; checks that they agree
identity      random token ids straight to the model, outputs saved to .npz, like FT's identity_test.py
issue_request a JSON request file ({"config": {...}, "request": [{name, data, dtype}]}), like FT's issue_request.py

All speak HTTP or gRPC (`--protocol`); streaming (`--stream`, a decoupled model) needs gRPC.
"""
