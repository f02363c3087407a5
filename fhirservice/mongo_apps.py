"""App configs for Django's contrib apps when the metadata store is MongoDB.

django-mongodb-backend stores every primary key as an ObjectId. The contrib apps declare
integer auto fields in their own AppConfigs, which win over ``DEFAULT_AUTO_FIELD``, so
settings swap in these subclasses (and ``MIGRATION_MODULES`` points at ``mongo_migrations``,
whose migrations were generated with these configs) only when ``MONGODB_URI`` is set.
Our own apps need nothing of the kind: all their models have explicit primary keys.
"""

from django.contrib.admin.apps import AdminConfig
from django.contrib.auth.apps import AuthConfig
from django.contrib.contenttypes.apps import ContentTypesConfig

OBJECT_ID_AUTO_FIELD = "django_mongodb_backend.fields.ObjectIdAutoField"


class MongoAdminConfig(AdminConfig):
    """``django.contrib.admin`` with ObjectId primary keys."""

    default_auto_field = OBJECT_ID_AUTO_FIELD


class MongoAuthConfig(AuthConfig):
    """``django.contrib.auth`` with ObjectId primary keys."""

    default_auto_field = OBJECT_ID_AUTO_FIELD


class MongoContentTypesConfig(ContentTypesConfig):
    """``django.contrib.contenttypes`` with ObjectId primary keys."""

    default_auto_field = OBJECT_ID_AUTO_FIELD
