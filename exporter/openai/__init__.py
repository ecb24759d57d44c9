"""An OpenAI-compatible HTTP front end over a served repository (`ft-exporter-openai`).

protocol.py parses and checks the request bodies and builds the response bodies, chat_template.py renders the
checkpoint's chat template as transformers does, backend.py turns a request into the model's tensor interface
through tritonclient, server.py is the HTTP server and its command line.
"""
