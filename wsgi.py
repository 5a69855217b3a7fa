"""WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`, `flask --app wsgi init-db`."""
from bloom import create_app

app = create_app()
