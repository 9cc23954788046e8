"""The console role: pages, a JSON API and live updates over the service's own stores."""
